# Sourced by check.sh on the GPU machine: puts the CUDA 13 runtime libraries on the loader path
# and unpacks the bundle's oedit binary. Expects BUNDLE (the folder bundle.sh wrote).
libs=$(for n in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
  find /usr/local /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))') \
    -name "$n" 2>/dev/null | head -1 | xargs -r dirname; done | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
[ -x "$BUNDLE/oedit" ] || { xz -d -k -f "$BUNDLE/oedit.xz" && chmod +x "$BUNDLE/oedit"; }
O="$BUNDLE/oedit"
