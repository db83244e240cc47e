//! The sampling kernels: every setting against the CPU reference, and the time per step.

use super::*;

/// Settings of parity row `i`: greedy, and every filter alone and together.
pub(crate) fn sampling_params(i: usize, seed: u64) -> SamplingParams {
    let base = SamplingParams {
        temperature: 0.8,
        seed,
        ..SamplingParams::default()
    };
    match i % 10 {
        0 => SamplingParams {
            temperature: 0.0,
            ..base
        },
        // Past the fast variant's 1,024 candidates: its general path.
        8 => SamplingParams {
            top_k: 2000,
            top_p: 0.8,
            ..base
        },
        // A top-p that needs most of the tail: a third pass or the general path.
        9 => SamplingParams {
            top_p: 0.999,
            temperature: 1.5,
            ..base
        },
        1 => base,
        2 => SamplingParams { top_k: 50, ..base },
        3 => SamplingParams { top_p: 0.9, ..base },
        4 => SamplingParams {
            min_p: 0.05,
            temperature: 1.2,
            ..base
        },
        5 => SamplingParams {
            top_k: 40,
            top_p: 0.95,
            min_p: 0.02,
            ..base
        },
        6 => SamplingParams { top_k: 1, ..base },
        7 => SamplingParams {
            top_p: 0.5,
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            temperature: 0.6,
            ..base
        },
        _ => unreachable!("i % 10"),
    }
}

/// Whether a sampled row's GPU token may differ from the CPU's by rounding alone: the top-p cut
/// moves when top-p shifts by 1e-4, or the target lies within 1e-4 of the mass of a boundary
/// of the GPU token.
pub(crate) fn sampling_boundary(row: &[f32], p: &SamplingParams, u: f32, got: u32) -> bool {
    for f in [1.0 - 1e-4, 1.0 + 1e-4] {
        let mut q = p.clone();
        q.top_p = (p.top_p * f).min(1.0);
        if p.top_p < 1.0 && kept_tokens(row, &q).0.len() != kept_tokens(row, p).0.len() {
            return true;
        }
    }
    let (kept, mass) = kept_tokens(row, p);
    let target = u as f64 * mass;
    let mut before = 0.0f64;
    for (id, w) in kept {
        let w = w as f64;
        if id == got {
            let tol = 1e-4 * mass;
            return (target - before).abs() < tol || (target - before - w).abs() < tol;
        }
        before += w;
    }
    false
}

/// The sampling kernel against the CPU reference, then the logits-edit kernel
/// ([`edit_parity`]); prints one `PARITY` line per case.
pub(crate) fn sampling_parity(dev: &Device, small: bool) -> Result<bool> {
    let mut rng = Rng(SplitMix64::new(17));
    let cases: &[(usize, usize)] = if small {
        &[(8, 1000), (5, 3001)]
    } else {
        &[(8, 1000), (16, 32003), (24, 49152), (16, 151936), (3, 7)]
    };
    let mut all_ok = true;
    for &(rows, vocab) in cases {
        for dtype in [DType::F32, DType::BF16] {
            // Rows of roughly normal logits times 3, a few tokens well above, and ties.
            let mut host: Vec<f32> = (0..rows * vocab)
                .map(|i| {
                    let x = rng.normal() * 3.0
                        + if rng.next().is_multiple_of(997) {
                            8.0
                        } else {
                            0.0
                        };
                    if i % 13 == 0 {
                        (x * 4.0).round() / 4.0
                    } else {
                        x
                    }
                })
                .collect();
            if dtype == DType::BF16 {
                host.iter_mut()
                    .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
            }
            let params: Vec<SamplingParams> =
                (0..rows).map(|i| sampling_params(i, rng.next())).collect();
            let steps: Vec<u64> = (0..rows).map(|_| rng.next() % 1000).collect();
            let penalties: Vec<Vec<PenaltyEntry>> = (0..rows)
                .map(|_| {
                    let mut ids: Vec<u32> = (0..20)
                        .map(|_| (rng.next() % vocab as u64) as u32)
                        .collect();
                    ids.sort_unstable();
                    ids.dedup();
                    ids.into_iter()
                        .map(|id| PenaltyEntry {
                            id,
                            count: 1 + (rng.next() % 4) as u32,
                            recent: rng.next().is_multiple_of(2),
                        })
                        .collect()
                })
                .collect();
            let bans: Vec<Vec<u32>> = (0..rows)
                .map(|_| (0..3).map(|_| (rng.next() % vocab as u64) as u32).collect())
                .collect();
            let reqs: Vec<Row<'_>> = (0..rows)
                .map(|i| Row {
                    params: &params[i],
                    step: steps[i],
                    penalties: &penalties[i],
                    bans: &bans[i],
                })
                .collect();
            let t = Tensor::from_vec(host.clone(), (rows, vocab), dev)?.to_dtype(dtype)?;
            for variant in [SampleVariant::General, SampleVariant::Fast] {
                let mut step = Step::new(&t, &reqs)?.with_variant(variant);
                step.poison()?;
                step.launch()?;
                let got = step.read()?;
                // Row 1 (a seeded draw) alone: the same token as inside the batch.
                let alone = {
                    let mut one = Step::new(&t.narrow(0, 1, 1)?.contiguous()?, &reqs[1..2])?
                        .with_variant(variant);
                    one.poison()?;
                    one.launch()?;
                    one.read()?[0]
                };
                let (mut exact, mut boundary, mut wrong) = (0, 0, Vec::new());
                for i in 0..rows {
                    let mut row = host[i * vocab..(i + 1) * vocab].to_vec();
                    apply_penalties(&mut row, &params[i], &penalties[i], &bans[i]);
                    let p = &params[i];
                    let want = if p.temperature == 0.0 {
                        argmax(&row)
                    } else {
                        argmax(&row).map(|_| draw(&row, p, SplitMix64::unit_at(p.seed, steps[i])))
                    };
                    if got[i] == want {
                        exact += 1;
                    } else if p.temperature > 0.0
                        && got[i].is_some_and(|g| {
                            sampling_boundary(&row, p, SplitMix64::unit_at(p.seed, steps[i]), g)
                        })
                    {
                        boundary += 1;
                    } else {
                        wrong.push(format!(
                            "row {i} ({}): gpu {:?} cpu {want:?}",
                            i % 10,
                            got[i]
                        ));
                    }
                }
                let ok = wrong.is_empty() && alone == got[1];
                all_ok &= ok;
                println!(
                "PARITY\tsampling {variant:?}\t{dtype:?} rows={rows} vocab={vocab}\texact={exact} boundary={boundary}\t{}{}",
                if ok { "ok" } else { "FAIL" },
                if alone == got[1] { String::new() } else { format!(" (row 1 alone {alone:?} vs {:?})", got[1]) },
            );
                for w in wrong.iter().take(5) {
                    println!("PARITY\tsampling {variant:?}\t{w}");
                }
            }
        }
    }
    // The logits processors' edits, which run before the sampling kernel in the engine.
    all_ok &= edit_parity(dev, small)?;
    Ok(all_ok)
}

/// The logits-edit kernel (logits processors' allow-lists and the citation nudge) against
/// [`Edit::apply`]: every edited row bitwise equal, the rows without an edit untouched. Rows
/// are built so the nudge fires in some (the top a sentence end, an open token within the
/// margin) and not in others, with ties for the top and among the open tokens, -inf entries,
/// ids past the vocabulary and repeated ids in allow-lists. Prints one `PARITY` line per shape.
pub(crate) fn edit_parity(dev: &Device, small: bool) -> Result<bool> {
    let mut rng = Rng(SplitMix64::new(29));
    let cases: &[(usize, usize)] = if small {
        &[(12, 1000)]
    } else {
        &[(12, 1000), (40, 49152), (24, 151936), (6, 7)]
    };
    let mut all_ok = true;
    for &(rows, vocab) in cases {
        let mut host: Vec<f32> = (0..rows * vocab).map(|_| rng.normal() * 3.0).collect();
        let ends = token_mask(vocab, |t| t % 5 == 2);
        let mut edits: Vec<Edit> = Vec::new();
        for r in 0..rows {
            let row = &mut host[r * vocab..(r + 1) * vocab];
            let pick = |rng: &mut Rng| (rng.next() % vocab as u64) as u32;
            let edit = match r % 6 {
                0 => Edit::Keep,
                1 => {
                    let mut ids: Vec<u32> = (0..1 + r % 12).map(|_| pick(&mut rng)).collect();
                    ids.push(ids[0]);
                    ids.push(vocab as u32 + 3);
                    Edit::Allow(ids)
                }
                2 => Edit::Ban(vec![pick(&mut rng)]),
                _ => {
                    // A top at a sentence end (r % 6 == 3: tied at two ids; 4: an open token
                    // within the margin; 5: the top ends nothing).
                    let sentence_end = 2 + 5 * (pick(&mut rng) % ((vocab as u32 - 3) / 5 + 1));
                    let top = (sentence_end + u32::from(r % 6 == 5)).min(vocab as u32 - 1);
                    row[top as usize] = 20.0;
                    if r % 6 == 3 && top as usize + 5 < vocab {
                        row[top as usize + 5] = 20.0;
                    }
                    let open: Vec<u32> = (0..3)
                        .map(|_| pick(&mut rng))
                        .chain([vocab as u32 + 1])
                        .collect();
                    if r % 6 == 4 {
                        row[open[0] as usize] = 19.5;
                        row[open[2] as usize] = 19.5;
                        row[open[1] as usize] = f32::NEG_INFINITY;
                    }
                    Edit::Nudge(Nudge {
                        ends: ends.clone(),
                        open: open.into(),
                        margin: if r % 12 < 6 { 1.0 } else { 0.25 },
                    })
                }
            };
            // A few -inf entries everywhere.
            for _ in 0..4 {
                let t = pick(&mut rng) as usize;
                if row[t] < 19.0 {
                    row[t] = f32::NEG_INFINITY;
                }
            }
            edits.push(edit);
        }
        let t = Tensor::from_vec(host.clone(), (rows, vocab), dev)?;
        let listed: Vec<(usize, &Edit)> = edits.iter().enumerate().collect();
        apply_edits(&t, &listed)?;
        let got = t.flatten_all()?.to_vec1::<f32>()?;
        let (mut fired, mut wrong) = (0, Vec::new());
        for (r, e) in edits.iter().enumerate() {
            let mut want = host[r * vocab..(r + 1) * vocab].to_vec();
            e.apply(&mut want);
            if matches!(e, Edit::Nudge(_)) && want != host[r * vocab..(r + 1) * vocab] {
                fired += 1;
            }
            // A ban is the sampling kernel's: the edit kernel leaves the row as it was.
            if matches!(e, Edit::Ban(_)) {
                want.copy_from_slice(&host[r * vocab..(r + 1) * vocab]);
            }
            let row = &got[r * vocab..(r + 1) * vocab];
            if let Some(t) = (0..vocab).find(|&t| row[t].to_bits() != want[t].to_bits()) {
                wrong.push(
                    format!("row {r} ({e:?}): id {t}: gpu {} cpu {}", row[t], want[t])
                        .chars()
                        .take(200)
                        .collect::<String>(),
                );
            }
        }
        let ok = wrong.is_empty() && fired > 0;
        all_ok &= ok;
        println!(
            "PARITY\tlogits edit\trows={rows} vocab={vocab}\tnudges fired {fired}\t{}",
            if ok { "ok" } else { "FAIL" }
        );
        for w in wrong.iter().take(5) {
            println!("PARITY\tlogits edit\t{w}");
        }
    }
    Ok(all_ok)
}

/// Time per sampling step at `batch` x `vocab`, bf16 and f32 logits, three settings.
pub(crate) fn sampling_bench(
    dev: &Device,
    batch: usize,
    vocabs: &[usize],
    peak_tbs: f64,
) -> Result<()> {
    let mut rng = Rng(SplitMix64::new(23));
    let settings = [
        (
            "top_k50_top_p0.9",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.9,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "top_p0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "temperature0.8",
            SamplingParams {
                temperature: 0.8,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        ("greedy", SamplingParams::default()),
    ];
    for &vocab in vocabs {
        let host: Vec<f32> = (0..batch * vocab).map(|_| rng.normal() * 3.0).collect();
        for dtype in [DType::BF16, DType::F32] {
            let t = Tensor::from_vec(host.clone(), (batch, vocab), dev)?.to_dtype(dtype)?;
            for (name, p) in &settings {
                let reqs: Vec<Row<'_>> = (0..batch)
                    .map(|i| Row {
                        params: p,
                        step: i as u64,
                        penalties: &[],
                        bans: &[],
                    })
                    .collect();
                for variant in [SampleVariant::General, SampleVariant::Fast] {
                    let mut step = Step::new(&t, &reqs)?.with_variant(variant);
                    let stream = step.stream();
                    let ms = time_launches(&stream, 1.0, || Ok(step.launch()?))?;
                    let bytes = (batch * vocab * dtype.size_in_bytes()) as f64;
                    let floor_ms = bytes / (peak_tbs * 1e12) * 1e3;
                    println!(
                        "SAMPLE\t{name} {variant:?}\t{dtype:?} batch={batch} vocab={vocab}\t{ms:.3} ms\tone-pass floor {floor_ms:.3} ms ({:.1}%)",
                        100.0 * floor_ms / ms
                    );
                }
            }
        }
    }
    Ok(())
}
