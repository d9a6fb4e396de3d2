//! The per-edit records of a format-2 run directory: each edit's rank-one factors and the
//! change it made to each layer's O-Edit basis (rows removed, as indices, and rows appended,
//! exactly as the basis holds them, with their energies). One record per file
//! (`updates/edit-NNNNNNNN.safetensors`) until a chunk of [`super::CHUNK`] edits is complete, then
//! the chunk's records in one file (`updates/chunk-NNNNN.safetensors`). Resuming replays the
//! changes in order to rebuild each basis bit for bit.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::edit::{subspace::Subspace, AppliedUpdate};
use crate::fingerprint::Fnv;

/// Identity standing for a committed row whose live identity is unknown (never a real one).
pub(crate) const UNKNOWN: u64 = u64::MAX;

/// What one edit did to one layer's basis.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerChange {
    pub layer: u32,
    /// Indices (into the basis before the edit) of the rows the edit removed, ascending.
    pub removed: Vec<u32>,
    /// The appended rows, flattened (`energy.len()` rows of the key width).
    pub rows: Vec<f64>,
    /// Energy of each appended row.
    pub energy: Vec<f64>,
}

/// One edit's record.
#[derive(Debug, Clone)]
pub struct EditRecord {
    pub updates: Vec<AppliedUpdate>,
    pub changes: Vec<LayerChange>,
}

impl EditRecord {
    /// Content hash of the record.
    pub fn hash(&self) -> u64 {
        let mut h = Fnv::new();
        h.write(&(self.updates.len() as u64).to_le_bytes());
        for u in &self.updates {
            super::hash_update(&mut h, &u.r, &u.u, &u.key, u.layer as u32);
        }
        h.write(&(self.changes.len() as u64).to_le_bytes());
        for c in &self.changes {
            h.write(&c.layer.to_le_bytes());
            h.write(&(c.removed.len() as u64).to_le_bytes());
            for i in &c.removed {
                h.write(&i.to_le_bytes());
            }
            h.write(&(c.energy.len() as u64).to_le_bytes());
            super::hash_f64(&mut h, &c.rows);
            super::hash_f64(&mut h, &c.energy);
        }
        h.finish()
    }
}

/// The next link of the chain of record hashes that the commit point records.
pub fn chain(prev: u64, record: u64) -> u64 {
    let mut h = Fnv::new();
    h.write(&prev.to_le_bytes());
    h.write(&record.to_le_bytes());
    h.finish()
}

/// The change from the committed rows (`base`: their identities, [`UNKNOWN`] where not known)
/// to `now`, and the identities to compare the next edit with. Rows keep their order under
/// removal and new rows go to the end, so the rows of `base` still present must be the first
/// rows of `now`; when they are not (or identities were lost), the change removes every
/// committed row and appends all of `now`.
pub fn diff(layer: usize, base: &[u64], now: &Subspace) -> (Option<LayerChange>, Vec<u64>) {
    let dim = now.basis.dim();
    let all = |ids: Vec<u64>| {
        let change = LayerChange {
            layer: layer as u32,
            removed: (0..base.len() as u32).collect(),
            rows: now.basis.rows().iter().flatten().copied().collect(),
            energy: now.energy.clone(),
        };
        (Some(change), ids)
    };
    let Some(ids) = now.ids() else {
        return all(vec![UNKNOWN; now.len()]);
    };
    let present: HashSet<u64> = ids.iter().copied().collect();
    let mut removed = Vec::new();
    let mut kept = 0;
    for (i, id) in base.iter().enumerate() {
        if *id != UNKNOWN && present.contains(id) {
            if ids.get(kept) != Some(id) {
                return all(ids.to_vec());
            }
            kept += 1;
        } else {
            removed.push(i as u32);
        }
    }
    if removed.is_empty() && kept == ids.len() {
        return (None, ids.to_vec());
    }
    let rows: Vec<f64> = now.basis.rows()[kept..].iter().flatten().copied().collect();
    debug_assert_eq!(rows.len(), (ids.len() - kept) * dim);
    let change = LayerChange { layer: layer as u32, removed, rows, energy: now.energy[kept..].to_vec() };
    (Some(change), ids.to_vec())
}

/// A layer's basis being rebuilt from records.
#[derive(Default)]
pub struct Rebuild {
    rows: Vec<Vec<f64>>,
    energy: Vec<f64>,
}

impl Rebuild {
    /// Applies one change; errors when it does not fit the rows so far.
    pub fn apply(&mut self, c: &LayerChange, dim: usize) -> Result<()> {
        if c.rows.len() != c.energy.len() * dim {
            bail!(
                "layer {}: appended rows have width {}, not {dim}",
                c.layer,
                c.rows.len() / c.energy.len().max(1)
            );
        }
        if !c.removed.is_empty() {
            let mut keep = vec![true; self.rows.len()];
            for &i in &c.removed {
                *keep.get_mut(i as usize).context("a removed row index is out of range")? = false;
            }
            let mut k = keep.iter();
            self.rows.retain(|_| *k.next().unwrap());
            let mut k = keep.iter();
            self.energy.retain(|_| *k.next().unwrap());
        }
        self.rows.extend(c.rows.chunks(dim).map(|r| r.to_vec()));
        self.energy.extend_from_slice(&c.energy);
        Ok(())
    }

    /// The rebuilt subspace.
    pub fn finish(self, dim: usize) -> Subspace {
        Subspace::from_parts(dim, self.rows, self.energy)
    }
}

/// The metadata of a record file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    format: u32,
    first: usize,
    hashes: Vec<String>,
}

fn tensor<T: candle_core::WithDType>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// The tensors and metadata of a file holding `records` (edits `first`, `first + 1`, ...).
pub fn encode(
    first: usize,
    records: &[EditRecord],
    key_dim: usize,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let mut t = HashMap::new();
    let n = records.len();
    let ups: Vec<&AppliedUpdate> = records.iter().flat_map(|r| &r.updates).collect();
    let chs: Vec<&LayerChange> = records.iter().flat_map(|r| &r.changes).collect();
    t.insert("n_updates".into(), tensor(records.iter().map(|r| r.updates.len() as u32).collect(), &[n])?);
    t.insert("n_changes".into(), tensor(records.iter().map(|r| r.changes.len() as u32).collect(), &[n])?);
    if let Some(u0) = ups.first() {
        let (d, f) = (u0.r.len(), u0.u.len());
        if ups.iter().any(|u| u.r.len() != d || u.u.len() != f || u.key.len() != f) {
            bail!("updates of different shapes cannot share a checkpoint file");
        }
        let k = ups.len();
        t.insert("r".into(), tensor(ups.iter().flat_map(|u| u.r.iter().copied()).collect(), &[k, d])?);
        t.insert("u".into(), tensor(ups.iter().flat_map(|u| u.u.iter().copied()).collect(), &[k, f])?);
        t.insert("key".into(), tensor(ups.iter().flat_map(|u| u.key.iter().copied()).collect(), &[k, f])?);
        t.insert("layer".into(), tensor(ups.iter().map(|u| u.layer as u32).collect(), &[k])?);
    }
    if !chs.is_empty() {
        let c = chs.len();
        t.insert("change.layer".into(), tensor(chs.iter().map(|c| c.layer).collect(), &[c])?);
        t.insert(
            "change.removed".into(),
            tensor(chs.iter().map(|c| c.removed.len() as u32).collect(), &[c])?,
        );
        t.insert("change.added".into(), tensor(chs.iter().map(|c| c.energy.len() as u32).collect(), &[c])?);
        let removed: Vec<u32> = chs.iter().flat_map(|c| c.removed.iter().copied()).collect();
        if !removed.is_empty() {
            let r = removed.len();
            t.insert("removed".into(), tensor(removed, &[r])?);
        }
        let energy: Vec<f64> = chs.iter().flat_map(|c| c.energy.iter().copied()).collect();
        if !energy.is_empty() {
            let a = energy.len();
            let rows: Vec<f64> = chs.iter().flat_map(|c| c.rows.iter().copied()).collect();
            if rows.len() != a * key_dim {
                bail!("appended basis rows do not have the key width {key_dim}");
            }
            t.insert("rows".into(), tensor(rows, &[a, key_dim])?);
            t.insert("energy".into(), tensor(energy, &[a])?);
        }
    }
    // One metadata entry: safetensors writes a map's entries in no fixed order, and the files
    // must be the same bytes in a resumed run.
    let header =
        Header { format: 2, first, hashes: records.iter().map(|r| format!("{:016x}", r.hash())).collect() };
    let meta = HashMap::from([("record".to_string(), serde_json::to_string(&header)?)]);
    Ok((t, meta))
}

/// Reads back the records of a file written from [`encode`], checking each against its hash;
/// returns them with their hashes.
pub fn decode(
    path: &Path,
    t: &HashMap<String, Tensor>,
    meta: &HashMap<String, String>,
    first: usize,
    key_dim: usize,
) -> Result<Vec<(EditRecord, u64)>> {
    let corrupt = |what: &str| anyhow::anyhow!("{}: corrupt checkpoint ({what})", path.display());
    let get = |k: &str| t.get(k).ok_or_else(|| corrupt(&format!("no `{k}`")));
    let opt_u32 = |k: &str| -> Result<Vec<u32>> {
        Ok(match t.get(k) {
            Some(x) => x.to_vec1()?,
            None => Vec::new(),
        })
    };
    let header: Header = meta
        .get("record")
        .and_then(|h| serde_json::from_str(h).ok())
        .ok_or_else(|| corrupt("no record header"))?;
    if header.first != first || header.format != 2 {
        return Err(corrupt(&format!("it does not start at edit {first}")));
    }
    let hashes: Vec<u64> = header
        .hashes
        .iter()
        .map(|h| u64::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| corrupt("bad hashes"))?;
    let n_updates: Vec<u32> = get("n_updates")?.to_vec1()?;
    let n_changes: Vec<u32> = get("n_changes")?.to_vec1()?;
    if n_updates.len() != hashes.len() || n_changes.len() != hashes.len() {
        return Err(corrupt("record counts disagree"));
    }
    let total_u: usize = n_updates.iter().map(|&x| x as usize).sum();
    let rows2 =
        |k: &str| -> Result<Vec<Vec<f32>>> { Ok(if total_u > 0 { get(k)?.to_vec2()? } else { Vec::new() }) };
    let (r, u, key) = (rows2("r")?, rows2("u")?, rows2("key")?);
    let layer: Vec<u32> = if total_u > 0 { get("layer")?.to_vec1()? } else { Vec::new() };
    if r.len() != total_u || u.len() != total_u || key.len() != total_u || layer.len() != total_u {
        return Err(corrupt("tensor sizes disagree"));
    }
    let c_layer = opt_u32("change.layer")?;
    let c_removed = opt_u32("change.removed")?;
    let c_added = opt_u32("change.added")?;
    let removed = opt_u32("removed")?;
    let (rows, energy): (Vec<f64>, Vec<f64>) = match t.get("energy") {
        Some(e) => {
            let rows = get("rows")?;
            if rows.dims2()?.1 != key_dim {
                bail!(
                    "{}: basis rows have width {}, the model's keys have {key_dim}",
                    path.display(),
                    rows.dims2()?.1
                );
            }
            (rows.flatten_all()?.to_vec1()?, e.to_vec1()?)
        }
        None => Default::default(),
    };
    let total_c: usize = n_changes.iter().map(|&x| x as usize).sum();
    if c_layer.len() != total_c
        || c_removed.len() != total_c
        || c_added.len() != total_c
        || removed.len() != c_removed.iter().map(|&x| x as usize).sum::<usize>()
        || energy.len() != c_added.iter().map(|&x| x as usize).sum::<usize>()
        || rows.len() != energy.len() * key_dim
    {
        return Err(corrupt("tensor sizes disagree"));
    }
    let mut ups = r.into_iter().zip(u).zip(key).zip(layer);
    let (mut ci, mut ri, mut ai) = (0usize, 0usize, 0usize);
    let mut out = Vec::with_capacity(hashes.len());
    for (i, want) in hashes.iter().enumerate() {
        let updates = ups
            .by_ref()
            .take(n_updates[i] as usize)
            .map(|(((r, u), key), l)| AppliedUpdate { layer: l as usize, r, u, key })
            .collect();
        let mut changes = Vec::new();
        for _ in 0..n_changes[i] {
            let (nr, na) = (c_removed[ci] as usize, c_added[ci] as usize);
            changes.push(LayerChange {
                layer: c_layer[ci],
                removed: removed[ri..ri + nr].to_vec(),
                rows: rows[ai * key_dim..(ai + na) * key_dim].to_vec(),
                energy: energy[ai..ai + na].to_vec(),
            });
            ci += 1;
            ri += nr;
            ai += na;
        }
        let rec = EditRecord { updates, changes };
        if rec.hash() != *want {
            return Err(corrupt("content hash mismatch"));
        }
        out.push((rec, *want));
    }
    Ok(out)
}
