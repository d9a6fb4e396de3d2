//! Criterion benchmark: the forward pass of 11 prompts x 20 tokens on SmolLM2-135M (f32),
//! logits at every position, inside a rayon pool of BENCH_THREADS (default 2) threads.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use oedit::device::DeviceSpec;
use oedit::loader::load_model;
use oedit::model::{Batch, Padding, Taps};

fn forward(c: &mut Criterion) {
    let Some(path) = common::smollm2() else { return };
    let pool = common::pool();
    let lm = load_model(path.to_str().expect("utf-8 path"), &DeviceSpec::Cpu, None).expect("model");
    let seqs: Vec<Vec<u32>> =
        (0..11u32).map(|r| (0..20u32).map(|i| 1000 + (r * 37 + i * 101) % 40000).collect()).collect();
    let batch = Batch::new(seqs, Padding::Right, 0).expect("batch");
    let mut g = c.benchmark_group("forward");
    g.sample_size(10);
    g.bench_function(format!("smollm2_11x20_{}threads", common::threads()), |b| {
        b.iter(|| pool.install(|| lm.model.forward(&batch, &Taps::default()).expect("forward")))
    });
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
