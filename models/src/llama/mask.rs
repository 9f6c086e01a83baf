//! [`PaddingMask`]: which positions of a padded batch are real tokens, the position ids that
//! follow from it (HF: `cumsum(attention_mask) - 1`), and the attention inputs one forward call
//! shares across layers ([`AttentionInputs`]: RoPE tables of those positions and which keys each
//! query may not see, causal order and key padding together).

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::rope::RotaryEmbedding;

/// Which positions of a `[batch, seq]` input are real tokens: HF's `attention_mask` (1 = token,
/// 0 = padding), kept on the host because position ids and cache bookkeeping are computed there.
///
/// Build it from lengths ([`left_padded`](Self::left_padded),
/// [`right_padded`](Self::right_padded)), from flags ([`new`](Self::new)) or from a tensor
/// (`Tensor<2, Int>`: non-zero = real; `Tensor<2, Bool>`: `true` = real) with `into()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddingMask {
    batch: usize,
    seq: usize,
    real: Vec<bool>,
}

impl PaddingMask {
    /// A mask from row-major flags (`true` = real token).
    ///
    /// # Panics
    /// If `real.len() != batch * seq`.
    pub fn new(batch: usize, seq: usize, real: Vec<bool>) -> Self {
        assert_eq!(
            real.len(),
            batch * seq,
            "PaddingMask::new: {} flags for a [{batch}, {seq}] mask",
            real.len()
        );
        Self { batch, seq, real }
    }

    /// No padding: every position of `[batch, seq]` is a real token.
    pub fn all_real(batch: usize, seq: usize) -> Self {
        Self::new(batch, seq, vec![true; batch * seq])
    }

    /// Rows of `lengths[r]` real tokens at the END of `seq` positions (pads first), as for
    /// batched generation.
    ///
    /// # Panics
    /// If a length exceeds `seq`.
    pub fn left_padded(lengths: &[usize], seq: usize) -> Self {
        let real = lengths
            .iter()
            .flat_map(|&n| {
                assert!(n <= seq, "PaddingMask::left_padded: length {n} > seq {seq}");
                (0..seq).map(move |i| i >= seq - n)
            })
            .collect();
        Self::new(lengths.len(), seq, real)
    }

    /// Rows of `lengths[r]` real tokens at the START of `seq` positions (pads last).
    ///
    /// # Panics
    /// If a length exceeds `seq`.
    pub fn right_padded(lengths: &[usize], seq: usize) -> Self {
        let real = lengths
            .iter()
            .flat_map(|&n| {
                assert!(n <= seq, "PaddingMask::right_padded: length {n} > seq {seq}");
                (0..seq).map(move |i| i < n)
            })
            .collect();
        Self::new(lengths.len(), seq, real)
    }

    /// `[batch, seq]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.batch, self.seq]
    }

    /// The flags of row `r` (length `seq`).
    ///
    /// # Panics
    /// If `r >= batch`.
    pub fn row(&self, r: usize) -> &[bool] {
        assert!(r < self.batch, "PaddingMask::row: row {r} of {}", self.batch);
        &self.real[r * self.seq..(r + 1) * self.seq]
    }

    /// Whether no position is padding.
    pub fn is_all_real(&self) -> bool {
        self.real.iter().all(|&x| x)
    }

    /// Number of real tokens of each row.
    pub fn lengths(&self) -> Vec<usize> {
        (0..self.batch).map(|r| self.row(r).iter().filter(|&&x| x).count()).collect()
    }

    /// The mask as HF's integer `attention_mask` (1 = real, 0 = padding).
    ///
    /// # Shapes
    /// - output: `[batch, seq]`
    pub fn to_tensor(&self, device: &Device) -> Tensor<2, Int> {
        let data: Vec<i64> = self.real.iter().map(|&x| i64::from(x)).collect();
        Tensor::from_data(TensorData::new(data, [self.batch, self.seq]), device)
    }

    /// Position ids, row-major `[batch, seq]`: row `r` continues from `start[r]` (the number of
    /// real tokens already cached for it, 0 without a cache), counting real tokens only, as
    /// HF's `start + cumsum(mask) - 1`. A pad gets the position of the last real token before
    /// it (0 when there is none), so a left-padded row's tokens get the same positions as the
    /// unpadded sequence.
    ///
    /// # Panics
    /// If `start.len() != batch`.
    pub fn position_ids(&self, start: &[usize]) -> Vec<usize> {
        assert_eq!(start.len(), self.batch, "PaddingMask::position_ids: {} starts", start.len());
        let mut out = Vec::with_capacity(self.real.len());
        for (r, &first) in start.iter().enumerate() {
            let mut count = 0;
            for &real in self.row(r) {
                if real {
                    out.push(first + count);
                    count += 1;
                } else {
                    out.push((first + count).saturating_sub(1));
                }
            }
        }
        out
    }
}

impl From<Tensor<2, Int>> for PaddingMask {
    /// Non-zero entries are real tokens (HF `attention_mask`). Reads the tensor to the host.
    fn from(mask: Tensor<2, Int>) -> Self {
        let [batch, seq] = mask.dims();
        let real = mask.into_data().iter::<i64>().map(|x| x != 0).collect();
        Self::new(batch, seq, real)
    }
}

impl From<Tensor<2, Bool>> for PaddingMask {
    /// `true` entries are real tokens. Reads the tensor to the host.
    fn from(mask: Tensor<2, Bool>) -> Self {
        mask.int().into()
    }
}

/// What the attention layers of one forward call share: the RoPE tables of the call's
/// positions and which keys each query may not attend to.
///
/// A query at cache slot `t` (cached positions first, then this call's) may attend key slot
/// `j` when `j <= t` and key `j` is a real token, and always attends itself: a pad query (a
/// left pad, which has no earlier real key) then attends only itself and stays finite, while
/// real queries never see pads. Blocked scores are overwritten (masked fill, not an additive
/// `0 · MIN` product) with [`CAUSAL_MASK_BIAS`](super::CAUSAL_MASK_BIAS).
#[derive(Debug, Clone)]
pub struct AttentionInputs {
    /// RoPE cosines `[batch or 1, seq, head_dim]` of the queries' and new keys' positions.
    pub cos: Tensor<3>,
    /// RoPE sines, as `cos`.
    pub sin: Tensor<3>,
    /// `true` where query `i` may NOT attend key `j`: `[batch or 1, seq, cached + seq]`.
    /// `None` when every query sees every key (one unpadded new position).
    pub blocked: Option<Tensor<3, Bool>>,
}

impl AttentionInputs {
    /// Unpadded causal attention of `seq` new positions after `offset` cached ones (the same
    /// for every row).
    ///
    /// # Panics
    /// If `rope`'s head width is odd (never for a valid [`RotaryEmbedding`]).
    pub fn causal(rope: &RotaryEmbedding, seq: usize, offset: usize, device: &Device) -> Self {
        let (cos, sin) = rope.tables(offset, seq, device);
        let hd = rope.head_dim();
        let total = offset + seq;
        let blocked = (seq > 1).then(|| {
            let flags: Vec<bool> =
                (0..seq).flat_map(|i| (0..total).map(move |j| j > offset + i)).collect();
            Tensor::from_data(TensorData::new(flags, [1, seq, total]), device)
        });
        Self { cos: cos.reshape([1, seq, hd]), sin: sin.reshape([1, seq, hd]), blocked }
    }

    /// [`padded`](Self::padded) without a cache: every row's positions start at 0.
    pub fn uncached(rope: &RotaryEmbedding, mask: &PaddingMask, device: &Device) -> Self {
        let batch = mask.dims()[0];
        Self::padded(rope, &vec![Vec::new(); batch], &vec![0; batch], mask, device)
    }

    /// Padded attention of a `[batch, seq]` call whose real tokens are `mask`, after cached
    /// keys whose real flags are `past[r]` (all rows the same length, empty without a cache),
    /// with row `r`'s positions continuing from `next_positions[r]`
    /// (see [`PaddingMask::position_ids`]).
    ///
    /// # Panics
    /// If `past` or `next_positions` do not have `batch` rows, or the `past` rows differ in
    /// length.
    pub fn padded(
        rope: &RotaryEmbedding,
        past: &[Vec<bool>],
        next_positions: &[usize],
        mask: &PaddingMask,
        device: &Device,
    ) -> Self {
        let [batch, seq] = mask.dims();
        assert_eq!(past.len(), batch, "AttentionInputs::padded: {} cached rows", past.len());
        let offset = past.first().map_or(0, Vec::len);
        assert!(
            past.iter().all(|p| p.len() == offset),
            "AttentionInputs::padded: cached rows of different lengths"
        );
        let positions = mask.position_ids(next_positions);
        let same_rows = positions.chunks(seq.max(1)).all(|row| row == &positions[..seq]);
        let (cos, sin) = if same_rows {
            rope.position_tables(&positions[..seq], 1, seq, device)
        } else {
            rope.position_tables(&positions, batch, seq, device)
        };

        let total = offset + seq;
        let mut flags = Vec::with_capacity(batch * seq * total);
        for (r, cached) in past.iter().enumerate() {
            let keys: Vec<bool> = cached.iter().chain(mask.row(r)).copied().collect();
            for i in 0..seq {
                let t = offset + i;
                flags.extend((0..total).map(|j| !(j == t || (j < t && keys[j]))));
            }
        }
        let blocked = flags
            .iter()
            .any(|&b| b)
            .then(|| Tensor::from_data(TensorData::new(flags, [batch, seq, total]), device));
        Self { cos, sin, blocked }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_real_tokens() {
        let left = PaddingMask::left_padded(&[3, 1], 4);
        assert_eq!(left.position_ids(&[0, 0]), vec![0, 0, 1, 2, 0, 0, 0, 0]);
        let right = PaddingMask::right_padded(&[3, 1], 4);
        assert_eq!(right.position_ids(&[0, 0]), vec![0, 1, 2, 2, 0, 0, 0, 0]);
        // Continuing a cache: row 0 has 3 real tokens cached, row 1 one.
        let step = PaddingMask::new(2, 1, vec![true, false]);
        assert_eq!(step.position_ids(&[3, 1]), vec![3, 0]);
        assert_eq!(left.lengths(), vec![3, 1]);
    }

    #[test]
    fn pads_are_blocked_except_for_their_own_query() {
        let device = Device::default();
        let rope = RotaryEmbedding::new(4, 10_000.0, None);
        // Row 0: [pad, a, b]; row 1: [a, b, c].
        let mask = PaddingMask::left_padded(&[2, 3], 3);
        let inputs = AttentionInputs::padded(&rope, &[vec![], vec![]], &[0, 0], &mask, &device);
        let blocked: Vec<bool> =
            inputs.blocked.unwrap().int().into_data().iter::<i64>().map(|x| x != 0).collect();
        let (t, f) = (true, false);
        #[rustfmt::skip]
        let want = vec![
            f, t, t,   t, f, t,   t, f, f, // the pad sees itself only; real queries skip it
            f, t, t,   f, f, t,   f, f, f, // plain causal
        ];
        assert_eq!(blocked, want);
        assert_eq!(inputs.cos.dims(), [2, 3, 4]);
        // One unpadded decoding step blocks nothing.
        let step = PaddingMask::all_real(2, 1);
        let past = vec![vec![true; 3], vec![true; 3]];
        let inputs = AttentionInputs::padded(&rope, &past, &[3, 3], &step, &device);
        assert!(inputs.blocked.is_none());
        assert_eq!(inputs.cos.dims(), [1, 1, 4]);
    }
}
