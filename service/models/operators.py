"""The ATen operators an uploaded torch.export program may call: pure tensor math.

A program's graph names each call as "torch.ops.aten.<name>.<overload>". Only names in
`ALLOWED` pass (with any overload, and the in-place form "<name>_" of an allowed name).
Everything else is refused, in particular operators that touch files (`from_file`),
raw storage or memory layout (`set_`, `as_strided`, `resize_`), uninitialised memory
that could leak other data (`empty`, `empty_strided`, `new_empty`), devices, streams or
processes. The list covers what GAN generators, discriminators, feature extractors and
classifiers exported from standard `torch.nn` layers use; a program that needs another
operator is refused with its name, and the name can be reviewed and added here.
"""

from __future__ import annotations

_ELEMENTWISE = """
abs acos acosh add addcdiv addcmul asin asinh atan atan2 atanh bitwise_and bitwise_not
bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clip copysign cos cosh div eq erf
erfc erfinv exp exp2 expm1 fill floor floor_divide fmax fmin fmod frac ge gt hypot isfinite
isinf isnan le lerp log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not
logical_or logical_xor logit lt masked_fill maximum minimum mul nan_to_num ne neg pow
reciprocal remainder round rsqrt rsub sgn sign sin sinh sqrt square sub tan tanh
true_divide trunc where xlogy
"""
_ACTIVATIONS = """
celu elu gelu glu hardsigmoid hardswish hardtanh leaky_relu log_sigmoid
log_sigmoid_forward log_softmax _log_softmax mish prelu relu relu6 rrelu selu sigmoid silu
softmax _softmax softplus softshrink softsign hardshrink tanhshrink threshold
"""
_REDUCTIONS = """
all amax amin any argmax argmin cumprod cumsum linalg_vector_norm logsumexp max mean min
norm prod std std_mean sum var var_mean
"""
_LINEAR_ALGEBRA = """
addmm addmv baddbmm bmm dot einsum linear matmul mm mv outer _addmm_activation
"""
_LAYERS = """
_adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d avg_pool1d avg_pool2d
avg_pool3d batch_norm _native_batch_norm_legit _native_batch_norm_legit_functional
_native_batch_norm_legit_no_training native_batch_norm conv1d conv2d conv3d
conv_transpose1d conv_transpose2d conv_transpose3d convolution _convolution dropout
feature_dropout native_dropout embedding group_norm native_group_norm instance_norm
layer_norm native_layer_norm max_pool1d max_pool2d max_pool2d_with_indices max_pool3d
max_pool3d_with_indices pixel_shuffle pixel_unshuffle scaled_dot_product_attention
_scaled_dot_product_flash_attention_for_cpu upsample_bilinear2d upsample_nearest1d
upsample_nearest2d upsample_nearest3d _upsample_bilinear2d_aa constant_pad_nd pad
reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d
"""
_SHAPES = """
alias cat chunk clone contiguous copy detach expand expand_as flatten flip gather index
index_select lift_fresh_copy movedim narrow permute repeat repeat_interleave reshape roll
select slice split split_with_sizes squeeze stack t tile _to_copy to transpose type_as
unbind unflatten unsqueeze _unsafe_view view view_as
"""
_CREATION = """
arange full full_like linspace ones ones_like scalar_tensor zeros zeros_like
bernoulli normal rand rand_like randint randn randn_like uniform
"""
_SHAPE_CHECKS = """
_assert_async _assert_scalar _assert_tensor_metadata sym_constrain_range
sym_constrain_range_for_size sym_numel sym_size sym_storage_offset sym_stride item
_local_scalar_dense
"""

ALLOWED: frozenset[str] = frozenset(
    " ".join(
        (_ELEMENTWISE, _ACTIVATIONS, _REDUCTIONS, _LINEAR_ALGEBRA, _LAYERS, _SHAPES, _CREATION,
         _SHAPE_CHECKS)
    ).split()
)  # fmt: skip
ATEN = "torch.ops.aten."


def allowed_aten(target: str) -> bool:
    """Whether "torch.ops.aten.<name>[.<overload>]" calls an allowed operator."""
    if not target.startswith(ATEN):
        return False
    name, _, overload = target[len(ATEN) :].partition(".")
    if not (name.isidentifier() and (not overload or overload.isidentifier())):
        return False
    return name in ALLOWED or (name.endswith("_") and name[:-1] in ALLOWED)
