//! Block-level activation recomputation (gradient checkpointing) for a stack of blocks that
//! map `[batch, seq, d]` to `[batch, seq, d]`: decoder layers, encoder layers.
//!
//! Plain autodiff keeps every saved input of every operation from the first block to the loss
//! until `backward` (Burn's `BalancedCheckpointing` recomputes only cheap element-wise ops and
//! still keeps the products' outputs). Here:
//!
//! 1. [`forward_keeping_inputs`] runs the blocks once without a graph (each on a copy whose
//!    parameters require no gradient: dropout stays on, nothing is saved), keeping only each
//!    block's **input**;
//! 2. the caller computes its loss from the stack's output made a leaf
//!    (`output.detach().require_grad()`) and takes that leaf's gradient;
//! 3. [`backward_recomputed`] re-runs the blocks last to first with a graph, one at a time:
//!    `Σ y ⊙ g` of a block's output `y` and the gradient `g` from above back-propagates to the
//!    block's parameters and to its input, which is the next `g`.
//!
//! Peak memory is the blocks' inputs plus one block's graph, for a second forward pass of every
//! block. The gradients are plain autodiff's within f32 rounding (the same operations on the
//! same values). Dropout draws its masks from the device's generator, so both runs of block `i`
//! reseed it with [`block_seed`]`(step_seed, i)`; the masks differ from an unrecomputed run's,
//! which draws them in sequence.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;

/// The seed both runs of block `block` use in a step that drew `step_seed` (from
/// [`emloc::nn::device_seed`], the draw of a dropout call): SplitMix64's output `block`.
pub fn block_seed(step_seed: u64, block: usize) -> u64 {
    emloc::nn::splitmix64(step_seed, block as u64)
}

/// Runs `blocks` in order on `input` without building a graph and returns the output (which
/// requires no gradient) and every block's input. `forward` applies one block.
pub fn forward_keeping_inputs<L: Module>(
    blocks: &[L],
    input: Tensor<3>,
    step_seed: u64,
    forward: impl Fn(&L, Tensor<3>) -> Tensor<3>,
) -> (Tensor<3>, Vec<Tensor<3>>) {
    // A lazily initialised parameter draws from the device's generator at first use: do that
    // now, or the first run of its block would draw other dropout masks than the second.
    blocks.iter().for_each(|block| block.visit(&mut Materialize));
    let mut inputs = Vec::with_capacity(blocks.len());
    let mut hidden = input.detach();
    for (i, block) in blocks.iter().enumerate() {
        hidden.device().seed(block_seed(step_seed, i));
        inputs.push(hidden.clone());
        hidden = forward(&block.clone().no_grad(), hidden);
    }
    (hidden, inputs)
}

/// Back-propagates `upstream`, the gradient at the output of `blocks` (without autodiff), by
/// re-running each block on its input from [`forward_keeping_inputs`] (same `step_seed` and
/// `forward`), last to first. Every block's parameter gradients go into `accumulator` (for the
/// whole `model` the blocks belong to); returns the gradient at the stack's input.
///
/// # Panics
/// If `inputs` does not hold one tensor per block.
pub fn backward_recomputed<L: Module, M: Module>(
    blocks: &[L],
    mut inputs: Vec<Tensor<3>>,
    mut upstream: Tensor<3>,
    step_seed: u64,
    forward: impl Fn(&L, Tensor<3>) -> Tensor<3>,
    model: &M,
    accumulator: &mut GradientsAccumulator<M>,
) -> Tensor<3> {
    assert_eq!(inputs.len(), blocks.len(), "backward_recomputed: one input per block");
    for (i, block) in blocks.iter().enumerate().rev() {
        let input = inputs.pop().expect("one input per block");
        input.device().seed(block_seed(step_seed, i));
        let input = input.detach().require_grad();
        let output = forward(block, input.clone());
        let mut grads = (output * upstream).sum().backward();
        upstream = input.grad_remove(&mut grads).unwrap_or_else(|| {
            // A block that ignores its input (never in practice) passes no gradient on.
            input.clone().inner().zeros_like()
        });
        accumulator.accumulate(model, GradientsParams::from_module(&mut grads, block));
    }
    upstream
}

/// Materialises every float parameter it visits.
struct Materialize;

impl ModuleVisitor for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        drop(param.val());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, Distribution};
    use emloc::nn::{Dropout, DropoutConfig};

    /// `dropout(relu(x W + b)) + ½` blocks, from plain Burn layers as any user's.
    #[derive(Module, Debug)]
    struct Stack {
        blocks: Vec<Linear>,
        dropout: Dropout,
    }

    #[test]
    fn recomputed_gradients_equal_plain_autodiff_with_and_without_dropout() {
        for prob in [0.0, 0.5] {
            let device = Device::flex().autodiff();
            device.seed(3);
            let stack = Stack {
                blocks: (0..3).map(|_| LinearConfig::new(8, 8).init(&device)).collect(),
                dropout: DropoutConfig::new(prob).init(),
            };
            let block = |b: &Linear, x: Tensor<3>| {
                stack.dropout.forward(burn::tensor::activation::relu(b.forward(x))) + 0.5
            };
            // Burn initialises parameters lazily, from the device's generator at first use:
            // materialise them first, so that the reference's draws are only dropout's.
            stack.blocks.iter().for_each(|b| drop(b.weight.val()));
            stack.blocks.iter().for_each(|b| drop(b.bias.as_ref().unwrap().val()));
            let x = Tensor::<3>::random([2, 5, 8], Distribution::Default, &device);
            let loss_of = |y: Tensor<3>| y.powi_scalar(2).sum();
            let step_seed = 9;

            // The reference: plain autodiff through the same per-block seeding.
            let mut hidden = x.clone();
            for (i, b) in stack.blocks.iter().enumerate() {
                device.seed(block_seed(step_seed, i));
                hidden = block(b, hidden);
            }
            let plain = GradientsParams::from_grads(loss_of(hidden).backward(), &stack);

            let (out, inputs) = forward_keeping_inputs(&stack.blocks, x, step_seed, block);
            let leaf = out.require_grad();
            let mut grads = loss_of(leaf.clone()).backward();
            let upstream = leaf.grad_remove(&mut grads).unwrap();
            let mut accumulator = GradientsAccumulator::new();
            let blocks = &stack.blocks;
            backward_recomputed(
                blocks,
                inputs,
                upstream,
                step_seed,
                block,
                &stack,
                &mut accumulator,
            );
            let recomputed = accumulator.grads();

            let vec = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
            for b in blocks {
                let (want, got) = (
                    vec(plain.get(b.weight.id).unwrap()),
                    vec(recomputed.get(b.weight.id).unwrap()),
                );
                let diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(diff < 1e-5, "dropout {prob}: {diff}");
                assert!(
                    want.iter().any(|&v| v != 0.0),
                    "dropout {prob}: a zero gradient tests nothing"
                );
            }
        }
    }
}
