//! [`BertModel`]'s forward pass for gradient checkpointing ([`crate::checkpointing`]): the
//! layers run without a graph keeping only their inputs, and are re-run one at a time when the
//! gradient at the last hidden state is known.

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Int, Tensor};

use super::model::attention_mask_bias;
use super::{BertInput, BertLayer, BertModel, SentenceEncoder};
use crate::checkpointing::{backward_recomputed, block_seed, forward_keeping_inputs};

/// What [`BertModel::forward_checkpointed`] keeps for [`backward`](Self::backward).
#[derive(Debug)]
pub struct CheckpointedForward {
    /// Hidden states of the last layer, `[batch, seq, d]`: a leaf that requires a gradient, to
    /// compute the loss from.
    pub last_hidden_state: Tensor<3>,
    layer_inputs: Vec<Tensor<3>>,
    mask_bias: Option<Tensor<4>>,
    input_ids: Tensor<2, Int>,
    token_type_ids: Tensor<2, Int>,
    step_seed: u64,
}

impl BertModel {
    /// [`forward`](Self::forward)'s last hidden state without a graph: every layer's input is
    /// kept, nothing else. Call [`CheckpointedForward::backward`] with the gradient at
    /// `last_hidden_state` to get the parameters' gradients. The pooler is not run.
    ///
    /// # Panics
    /// As [`forward`](Self::forward); if the model is not on an autodiff device.
    pub fn forward_checkpointed(&self, input: BertInput) -> CheckpointedForward {
        let BertInput { input_ids, token_type_ids, attention_mask } = input;
        let device = self.embeddings.word_embeddings.weight.val().device();
        assert!(device.is_autodiff(), "BertModel::forward_checkpointed: not on autodiff");
        let token_type_ids =
            token_type_ids.unwrap_or_else(|| Tensor::<2, Int>::zeros(input_ids.dims(), &device));
        let mask_bias = attention_mask.map(attention_mask_bias);
        let step_seed = emloc::nn::device_seed(&device);
        let layers = &self.encoder.layer;
        // The embeddings' dropout is seeded as a block after the layers, in both runs.
        device.seed(block_seed(step_seed, layers.len()));
        let embedded =
            self.embeddings.clone().no_grad().forward(input_ids.clone(), token_type_ids.clone());
        let layer = |l: &BertLayer, h: Tensor<3>| l.forward(h, mask_bias.clone());
        let (hidden, layer_inputs) = forward_keeping_inputs(layers, embedded, step_seed, layer);
        CheckpointedForward {
            last_hidden_state: hidden.require_grad(),
            layer_inputs,
            mask_bias,
            input_ids,
            token_type_ids,
            step_seed,
        }
    }
}

impl CheckpointedForward {
    /// Back-propagates `upstream`, the loss's gradient at
    /// [`last_hidden_state`](Self::last_hidden_state) (e.g. `grad_remove` of it), through
    /// `model` (the one that ran the forward pass), recomputing one layer at a time; every
    /// parameter's gradient goes into `accumulator`.
    pub fn backward(
        self,
        model: &BertModel,
        upstream: Tensor<3>,
        accumulator: &mut GradientsAccumulator<BertModel>,
    ) {
        let mask_bias = self.mask_bias;
        let layer = |l: &BertLayer, h: Tensor<3>| l.forward(h, mask_bias.clone());
        let layers = &model.encoder.layer;
        let upstream = backward_recomputed(
            layers,
            self.layer_inputs,
            upstream,
            self.step_seed,
            layer,
            model,
            accumulator,
        );
        // Trainable embeddings (never with LoRA alone) get theirs from the first layer's.
        if model.embeddings.word_embeddings.weight.val().is_require_grad() {
            let device = model.embeddings.word_embeddings.weight.val().device();
            device.seed(block_seed(self.step_seed, layers.len()));
            let embedded = model.embeddings.forward(self.input_ids, self.token_type_ids);
            let mut grads = (embedded * upstream).sum().backward();
            accumulator
                .accumulate(model, GradientsParams::from_module(&mut grads, &model.embeddings));
        }
    }
}

impl SentenceEncoder {
    /// The value and gradients of `loss` of the pooled embeddings of two batches through
    /// `model` (e.g. sentences and label descriptions, or questions and answers), with the
    /// layers recomputed in the backward pass ([`BertModel::forward_checkpointed`]): plain
    /// autodiff's within f32 rounding (without dropout: with it, masks are drawn per layer), in
    /// the memory of one layer's activations.
    ///
    /// # Panics
    /// As [`BertModel::forward_checkpointed`].
    pub fn gradients_checkpointed(
        &self,
        model: &BertModel,
        inputs: [BertInput; 2],
        loss: impl FnOnce(Tensor<2>, Tensor<2>) -> Tensor<1>,
    ) -> (f64, GradientsParams) {
        let masks = inputs.each_ref().map(BertInput::attention_mask_or_ones);
        let passes = inputs.map(|input| model.forward_checkpointed(input));
        let [mask_a, mask_b] = masks;
        let a = self.pool(passes[0].last_hidden_state.clone(), mask_a);
        let b = self.pool(passes[1].last_hidden_state.clone(), mask_b);
        let loss = loss(a, b);
        let value = f64::from(loss.clone().into_scalar::<f32>());
        let mut grads = loss.backward();
        let upstream = passes.each_ref().map(|pass| {
            pass.last_hidden_state
                .grad_remove(&mut grads)
                .expect("the last hidden state's gradient")
        });
        let mut accumulator = GradientsAccumulator::new();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
        for (pass, upstream) in passes.into_iter().zip(upstream) {
            pass.backward(model, upstream, &mut accumulator);
        }
        (value, accumulator.grads())
    }
}
