"""Gaussian moments that travel between modules: ``MomentTensor``.

Modules: ``tensor`` (MomentTensor, split_moments, the handler table), ``arithmetic``,
``shape_ops``, ``norm_pool`` (the moment-preserving ops below, registered on import).

An LR layer in training produces, for every output element, a Gaussian N(m, v) (local
reparameterization). A downstream LR layer or stochastic sign can use (m, v) directly
instead of a single sample, which lowers the variance of the gradient (Shayer et al. 2018;
Roth et al. 2019). Between two such layers sits an arbitrary graph (a timm block:
BatchNorm, residual add, pooling, reshapes ...), so the moments travel *with* the tensor.

Contract
--------
``MomentTensor`` is a ``torch.Tensor`` subclass whose **data is a reparameterized sample**
(``mean + sqrt(var) * N(0, 1)`` unless the producer passes its own sample; a *deferred*
one draws it when first read, below), so any op that does not know about moments still
receives a valid stochastic tensor. It carries

    x.moment_mean   tensor of x.shape, differentiable (or None once invalidated)
    x.moment_var    tensor of x.shape, >= 0, differentiable (or None once invalidated)

- Producer (an LR layer in training): ``return MomentTensor.deferred(m, v, eps)``, the
  sample not drawn yet (or ``MomentTensor.from_moments(m, v, sample=...)`` with one).
- Consumer (an LR layer, a stochastic sign): ``mean, var = split_moments(x)``;
  ``var is None`` means a deterministic input (``mean`` is then x itself).

Deferred samples: where only moments are read (LR -> BatchNorm -> threshold -> sign ->
LR, the W1A1 path), a sample, its noise, BatchNorm on it and autograd's copies of them
are waste. A deferred MomentTensor carries (m, v) and an uninitialized placeholder; the
ops in ``DEFERRED_RULES`` (the affine arithmetic below and ``F.batch_norm``) map the
moments and return deferred results, metadata reads (shape, dtype, ``type_as`` ...) answer
from the placeholder, and any other op first draws the sample in place
(``materialize_``: m + sqrt(v + eps) e, once, so all its readers share it), then runs as
below. Drawing late is the same distribution under the independence assumptions below;
in training, BatchNorm of a deferred input takes the random tensor's statistics by the law
of total variance, mu_B = mean_i m_i, var_B = var_i m_i + mean_i v_i (what a sample's
batch statistics estimate), instead of one sample's.

Moment-preserving ops (implemented in ``__torch_function__``; the sample follows the op
exactly as on a plain tensor, the moments follow the rules below):

- elementwise affine with *constants*: ``+ - * /`` and their in-place / reflected forms
  with a Python number or any tensor without moments (a parameter, a buffer, or a plain
  tensor such as a residual shortcut); ``neg``. Moments are *conditional on every plain
  tensor*: a plain tensor is a realized value, and an LR layer fed a plain tensor treats
  it as deterministic too, so e.g. ``branch(x) + x`` for a plain block input x is exact.
  (The one approximate case is a plain tensor computed from the *sample* of a MomentTensor
  combined with that MomentTensor's descendants: their correlation is ignored, like the
  independence assumption below.)
- ``add``/``sub``/``mul`` of two MomentTensors, assumed independent (the standard LR-net
  approximation; a residual branch and its shortcut are correlated in truth):
  means add, variances add; products use Var = va vb + va mb^2 + vb ma^2.
- ``F.batch_norm`` in eval (running statistics: an affine map per channel) and in training
  (a drawn input; deferred: above): the data is normalized by ``F.batch_norm`` with the
  batch statistics of the *sample*
  (mu_B, var_B, what F.batch_norm computes on the data) and the moments go through the same
  affine map: m' = (m - mu_B) w / sqrt(var_B + eps) + b, v' = v w^2 / (var_B + eps).
- ``avg_pool2d``/``avg_pool3d`` (any padding, ``ceil_mode``, ``count_include_pad``,
  ``divisor_override``), ``adaptive_avg_pool1d/2d/3d``, ``mean`` and ``sum`` over dims:
  mean pooled, variance pooled with the squared weights (1/n^2 each) - elements of a window
  assumed independent.
- shape / copy ops applied to mean and var alike: view, reshape, flatten, permute,
  transpose, squeeze, unsqueeze, contiguous, clone, detach, expand, narrow, select,
  indexing, movedim, flip, rename, to / float / double / half, cat and stack (of
  MomentTensors only), dropout with ``training=False`` or ``p == 0``, identity.

Every other op (ReLU, convolution, linear, softmax ...) returns a **plain tensor** (the
op applied to the sample): never a MomentTensor with wrong moments. In-place ops that are
not moment-preserving (``relu_``, ``x[...] = ...``, ``F.relu(x, inplace=True)``), also
through a view of the same storage, invalidate the moments of the mutated MomentTensor
(tracked with the tensor's version counter: ``moment_mean`` / ``moment_var`` become None,
and ``split_moments`` then treats it as plain).

ReLU is deliberately *not* moment-preserving (the rectified Gaussian's moments would be
exact, but the next sign needs the Gaussian): for a sign with threshold t > 0,
sign(ReLU(a) - t) = sign(a - t), so a converter should drop a ReLU that feeds a thresholded
sign and the moment path stays Gaussian end to end.

Autograd flows from the sample and from both moments; ``torch.no_grad`` works as usual.

# References
- Shayer, Levi, Fetaya. "Learning Discrete Weights Using the Local Reparameterization
  Trick". ICLR 2018.
- Roth, Schindler, Fröning, Pernkopf. "Training Discrete-Valued Neural Networks with Sign
  Activations Using Weight Distributions". ECML-PKDD 2019.
"""

from __future__ import annotations

from . import arithmetic, norm_pool, shape_ops  # noqa: F401  (register the handlers)
from .tensor import DEFERRED_RULES, HANDLERS, MomentTensor, has_moments, split_moments

__all__ = ["MomentTensor", "split_moments", "has_moments", "MOMENT_PRESERVING_OPS",
           "DEFERRED_RULES"]

#: the functions whose results keep the moments (for documentation and tests)
MOMENT_PRESERVING_OPS = frozenset(HANDLERS)
