//! Quantized matrix products at the shapes of SmolLM2-135M: ours (`ops::qmatmul`, AVX-512 VNNI)
//! against plain candle on the same GGML blocks (`QMatMul` on the quantized tensor) and against
//! candle's f32 product on the dequantized matrix, in the same run. `n` rows of activations: 1 is
//! a one-stream decode step, 16 a batched decode step, 128 a prompt chunk.
//!
//!     cargo bench --bench qmatmul

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use cited::ops::qmatmul::QMatrix;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    // (name, type, rows, cols): stacked Q/K/V, stacked gate/up, down, the tied output projection.
    let shapes = [
        ("qkv_960x576_q4_1", GgmlDType::Q4_1, 960, 576),
        ("gate_up_3072x576_q4_1", GgmlDType::Q4_1, 3072, 576),
        ("down_576x1536_q4_1", GgmlDType::Q4_1, 576, 1536),
        ("lm_head_49152x576_q8_0", GgmlDType::Q8_0, 49152, 576),
    ];
    for (name, dtype, rows, cols) in shapes {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QMatrix::from_ggml(dtype, rows, cols, &q.data().unwrap()).unwrap();
        let candle_q = QMatMul::from_qtensor(q).unwrap();
        let candle_f32 = QMatMul::Tensor(w);
        let mut g = c.benchmark_group(name);
        g.sample_size(10);
        let ns: &[usize] = if rows > 10_000 {
            &[1, 16]
        } else {
            &[1, 4, 16, 128]
        };
        for &n in ns {
            g.throughput(Throughput::Elements((n * rows * cols) as u64));
            let x = Tensor::randn(0f32, 1.0, (n, cols), &dev).unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut out = vec![0f32; n * rows];
            g.bench_with_input(BenchmarkId::new("cited", n), &n, |b, &n| {
                b.iter(|| ours.matmul(&xv, n, &mut out).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("candle_quantized", n), &n, |b, _| {
                b.iter(|| candle_q.forward(&x).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("candle_f32", n), &n, |b, _| {
                b.iter(|| candle_f32.forward(&x).unwrap())
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
