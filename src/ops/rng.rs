//! SplitMix64: a small seeded generator, the same sequence on every machine. Tests, benches and
//! the GPU check draw their seeded inputs from it.

#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 24 bits.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// The `n`-th (from 0) [`unit`](Self::unit) of the stream seeded with `seed`, without the
    /// ones before it: a counter-based draw, so a kernel computes step `n` of any request alone.
    pub fn unit_at(seed: u64, n: u64) -> f32 {
        let mut r = Self(seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        r.unit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sequence_and_range() {
        // SplitMix64 from seed 0 starts with 0xE220A8397B1DCDAF.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut r = SplitMix64::new(5);
        let draws: Vec<f32> = (0..1000).map(|_| r.unit()).collect();
        assert!(draws.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = draws.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "{mean}");
        // The counter form gives the same stream.
        let mut r = SplitMix64::new(9);
        for n in 0..50 {
            assert_eq!(r.unit(), SplitMix64::unit_at(9, n));
        }
    }
}
