"""The layer-wise calibration loop, written once for every calibration-based method.

GPTQ, SparseGPT, Wanda, AWQ and friends all follow the same sequence (IST-DASLab's
``opt_sequential``), which this module implements with a small adapter per architecture
instead of one copy of the loop per model family:

1. Run the model on the calibration batch and capture the hidden states entering the first
   decoder layer, and the other arguments (attention mask, position embeddings, ...) the model
   gives each layer: they may differ between layers (Gemma's sliding-window and global layers).
2. For each decoder layer in order, for each group of its linear layers (true-sequential
   order: q/k/v, then the attention output, then the MLP input(s), then the MLP output):
   hook the group's linears, run the layer on every calibration sample so each linear's
   ``LayerCompressor`` sees its inputs, then compress the group.
3. Run the now-compressed layer once more; its outputs are the next layer's inputs, so each
   layer is calibrated on the activations of the already-compressed layers before it.

A method provides a factory ``make(name, module) -> LayerCompressor`` with ``add_batch``
(stream one sample's inputs and outputs) and ``compress`` (act, return what it achieved).

:func:`sequential` gives every compressor exactly the calls of :func:`sequential_reference`
(the loop as first written: five full passes per layer with true-sequential groups) and leaves
every layer's output bit-identical, but skips work whose result is already known: a pass stops
once the group's linears have fired; a layer's attention/MLP block whose inputs and modules are
unchanged returns the output it stored last pass, or re-runs only its last linear when that is
all that changed; the last linear of a group is not run at all when its compressor reads
inputs only. :class:`SharedGram` lets Hessian-streaming compressors share one ``xᵀx`` between
linears fed the same tensor (q/k/v, gate/up) and halve wide ones (:func:`gram`). Measured with
``benchmark.py loop-bench``; :func:`loop_variant` switches any of this off.

The modules: ``adapters`` (one per architecture: where the decoder layers and their linear
groups are), ``capture`` (each layer's inputs; the reference loop), ``loop`` (:func:`sequential`),
``memo`` (the fast loop's block memory), ``hessian`` (shared ``xᵀx`` products), ``bits``
(bitwise equality) and ``variant`` (switching shortcuts off). Method authors import from here.
"""

from slimbench.layerwise.adapters import (
    ADAPTERS,
    ArchAdapter,
    adapter_for,
    decoder_layers,
    drop_layers,
    get_path,
    has_adapter,
    teacher_depth,
)
from slimbench.layerwise.bits import same_tensor
from slimbench.layerwise.capture import (
    LayerCompressor,
    LayerInputs,
    capture_layer_inputs,
    run_layer,
    sequential_reference,
)
from slimbench.layerwise.hessian import HessianStream, SharedGram, gram, symmetric_from_upper
from slimbench.layerwise.loop import sequential
from slimbench.layerwise.memo import MEMO_BYTES
from slimbench.layerwise.variant import loop_variant

__all__ = [
    "ADAPTERS", "MEMO_BYTES", "ArchAdapter", "HessianStream", "LayerCompressor", "LayerInputs", "SharedGram",
    "adapter_for", "capture_layer_inputs", "decoder_layers", "drop_layers", "get_path", "gram", "has_adapter",
    "loop_variant", "run_layer", "same_tensor", "sequential", "sequential_reference", "symmetric_from_upper",
    "teacher_depth",
]
