r"""One-layer multi-head softmax attention for in-context linear regression.

*Paper:* He, Pan, Chen and Yang, "In-Context Linear Regression Demystified: Training Dynamics
and Mechanistic Interpretability of Multi-Head Softmax Attention" (ICML 2025, arXiv 2503.12734).
*Official code:* https://github.com/XintianPan/ICL_linear (``src/models.py``,
``src/funcs.py``, ``icl_linear.ipynb``).

**Data.** A task draws $\beta \sim \mathcal N(0, I_d / d)$; the context holds $L$ pairs
$x_\ell \sim \mathcal N(0, I_d)$, $y_\ell = \beta^\top x_\ell + \epsilon_\ell$,
$\epsilon_\ell \sim \mathcal N(0, \sigma^2)$, and the query $x_q$ has target
$y_q = \beta^\top x_q + \epsilon_q$ (the official ``LinearReg``: ``beta = randn * sqrt(1/d)``;
the notebook trains with $d = 5$, $L = 8d = 40$, $\sigma^2 = 0.1$).

**Model.** Tokens $z_\ell = (x_\ell, y_\ell) \in \mathbb R^{d+1}$ are the columns of
$Z \in \mathbb R^{(d+1) \times L}$; the query token is $z_q = (x_q, 0)$. With $H$ heads,

$$
\hat y = \sum_{h=1}^H \mathrm{OV}_h\, Z\, \operatorname{softmax}\big(Z^\top \mathrm{KQ}_h\, z_q\big),
\qquad \mathrm{KQ}_h \in \mathbb R^{(d+1)\times(d+1)},\ \mathrm{OV}_h \in \mathbb R^{1\times(d+1)} .
$$

The softmax runs over the $L$ context tokens only: the query does not attend to itself (the
official single-layer ``MultiHeadAttention`` takes ``z_q`` as the only query and ``z`` as keys
and values). **Normalisation chosen here:** there is no separate score scale; the official code
computes ``q . k / sqrt(d + 1)`` with ``KQ = W_K^T W_Q``, so its merged matrix is our
$\mathrm{KQ}_h$ times $\sqrt{d+1}$. With the scale absorbed, the paper's structured solution
$\mathrm{KQ}_h = \omega_h \begin{bmatrix} I_d & 0 \\ 0 & 0 \end{bmatrix}$ reads
$\operatorname{softmax}(\omega_h X^\top x_q)$, exactly the official ``TFEst.Est``. $\mathrm{OV}_h$ is
the row that maps a head's output to the prediction (``o_proj`` to one output times ``v_proj``):
"the last entry" of $\mathrm{OV}_h Z p$ in the paper's $(d+1)\times(d+1)$ notation.

**The emergent solution and the debiased GD predictor.** Training from a random start finds
$\mathrm{KQ}_h \approx \omega_h \operatorname{diag}(I_d, 0)$ (diagonal, homogeneous) and
$\mathrm{OV}_h \approx \mu_h e_{d+1}^\top$ (last entry only) with $\sum_h \mu_h \approx 0$
(zero sum). For small $\omega$, $\operatorname{softmax}(\omega s)_\ell \approx
\frac1L (1 + \omega (s_\ell - \bar s))$, so the zero sum cancels the mean $\bar y$ and

$$
\hat y \approx \Big(\sum_h \mu_h \omega_h\Big) \frac1L \sum_\ell y_\ell (x_\ell - \bar x)^\top x_q ,
$$

one step of gradient descent on the context's squared loss from $\beta = 0$, with the
covariates centred: the *debiased GD* predictor (:func:`debiased_gd`). :func:`ridge` is the
Bayes-optimal predictor for this prior, $\lambda = \sigma^2 d$ (the official ``RidgeEst``).

**Training** (:func:`train`) is plain NumPy: Adam on the merged $\mathrm{KQ}_h$ and
$\mathrm{OV}_h$ with the hand-derived gradients of :func:`loss_and_grads` (checked by finite
differences in the tests), fresh tasks every step, all randomness from one seed. The official
notebook trains the factored $W_Q, W_K, W_V, W_O$ with Adam (learning rate $10^{-3}$, batch 256,
500 000 steps on a GPU); training the merged matrices with a larger step reaches the same
patterns in seconds on a CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkv import _checks
from qkv.errors import ParameterError, ShapeError

Array = np.ndarray


@dataclass(frozen=True)
class ICLParams:
    """Weights of the one-layer, ``H``-head model on tokens of size ``D = d + 1``.

    Attributes:
        kq: the merged key-query matrices $\\mathrm{KQ}_h$, ``(H, D, D)``.
        ov: the merged output-value rows $\\mathrm{OV}_h$, ``(H, D)``.
    """

    kq: Array
    ov: Array

    @classmethod
    def init(cls, heads: int, d: int, *, std: float = 0.02, rng: np.random.Generator) -> ICLParams:
        """Random weights, every entry $\\mathcal N(0, \\text{std}^2)$, drawn from ``rng``."""
        kq = std * rng.standard_normal((heads, d + 1, d + 1))  # (H, D, D)
        return cls(kq, std * rng.standard_normal((heads, d + 1)))  # (H, D)


@dataclass(frozen=True)
class Tasks:
    """A batch of ``B`` regression prompts with ``L`` context pairs in ``d`` dimensions.

    Attributes:
        x: context covariates ``(B, L, d)``.
        y: context responses ``(B, L)``.
        x_q: query covariates ``(B, d)``.
        y_q: query targets ``(B,)``.
        beta: the tasks' coefficients ``(B, d)``.
    """

    x: Array
    y: Array
    x_q: Array
    y_q: Array
    beta: Array


@dataclass(frozen=True)
class Training:
    """What :func:`train` returns: the final weights, the loss of every step ``(steps,)`` and
    the wall time in seconds."""

    params: ICLParams
    losses: Array
    seconds: float


def sample_tasks(
    batch: int, context: int, d: int, *, noise: float = 0.1, rng: np.random.Generator
) -> Tasks:
    r"""Draw ``batch`` prompts: $\beta \sim \mathcal N(0, I_d/d)$, $x \sim \mathcal N(0, I_d)$,
    $y = \beta^\top x + \epsilon$, $\epsilon \sim \mathcal N(0, \text{noise})$ (``noise`` is the
    variance $\sigma^2$), the query's target noisy too. Returns :class:`Tasks` (float64).
    """
    for name, value in (("batch", batch), ("context", context), ("d", d)):
        _checks.positive_int(name, value)
    if not noise >= 0:
        raise ParameterError(f"noise: expected a variance >= 0, got {noise!r}")
    beta = rng.standard_normal((batch, d)) / np.sqrt(d)  # (B, d)
    x = rng.standard_normal((batch, context, d))  # (B, L, d)
    x_q = rng.standard_normal((batch, d))  # (B, d)
    sd = np.sqrt(noise)
    y = np.einsum("bld,bd->bl", x, beta) + sd * rng.standard_normal((batch, context))  # (B, L)
    y_q = np.einsum("bd,bd->b", x_q, beta) + sd * rng.standard_normal(batch)  # (B,)
    return Tasks(x, y, x_q, y_q, beta)


def tokens(x: Array, y: Array, x_q: Array) -> tuple[Array, Array]:
    """The prompt as tokens: ``z (B, L, d+1)`` with rows $(x_\\ell, y_\\ell)$ and the query
    token ``z_q (B, d+1)`` $= (x_q, 0)$, from ``x (B, L, d)``, ``y (B, L)``, ``x_q (B, d)``."""
    _check_prompt(x, y, x_q)
    z = np.concatenate([x, y[..., None]], axis=-1)  # (B, L, d+1)
    z_q = np.concatenate([x_q, np.zeros_like(x_q[:, :1])], axis=-1)  # (B, d+1)
    return z, z_q


def _check_prompt(x: Array, y: Array, x_q: Array) -> None:
    _checks.array("x", x, rank=3, layout="(B, L, d)")
    _checks.array("y", y, rank=2, layout="(B, L)")
    _checks.array("x_q", x_q, rank=2, layout="(B, d)")
    B, L, d = x.shape
    if tuple(y.shape) != (B, L):
        raise ShapeError(f"y: expected (B, L) = {(B, L)} as x, got {tuple(y.shape)}")
    if tuple(x_q.shape) != (B, d):
        raise ShapeError(f"x_q: expected (B, d) = {(B, d)} as x, got {tuple(x_q.shape)}")


def _check_model(z: Array, z_q: Array, kq: Array, ov: Array) -> None:
    _checks.array("z", z, rank=3, layout="(B, L, D)")
    _checks.array("z_q", z_q, rank=2, layout="(B, D)")
    _checks.array("kq", kq, rank=3, layout="(H, D, D)")
    _checks.array("ov", ov, rank=2, layout="(H, D)")
    _checks.same_dtype(z=z, z_q=z_q, kq=kq, ov=ov)
    B, _, D = z.shape
    if tuple(z_q.shape) != (B, D):
        raise ShapeError(f"z_q: expected (B, D) = {(B, D)} as z, got {tuple(z_q.shape)}")
    H = kq.shape[0]
    if tuple(kq.shape) != (H, D, D):
        raise ShapeError(f"kq: expected (H, D, D) with D = {D} as z, got {tuple(kq.shape)}")
    if tuple(ov.shape) != (H, D):
        raise ShapeError(f"ov: expected (H, D) = {(H, D)} as kq and z, got {tuple(ov.shape)}")


def _forward(z: Array, z_q: Array, kq: Array, ov: Array) -> tuple[Array, Array, Array]:
    """Prediction ``(B,)``, attention weights ``p (B, H, L)`` and head outputs ``u (B, H, D)``."""
    kz = np.einsum("hde,be->bhd", kq, z_q)  # (B, H, D): KQ_h z_q
    s = kz @ z.swapaxes(1, 2)  # (B, H, D) @ (B, D, L) = (B, H, L): z_l^T KQ_h z_q
    p = np.exp(s - s.max(axis=-1, keepdims=True))  # (B, H, L), row max subtracted
    p /= p.sum(axis=-1, keepdims=True)
    u = p @ z  # (B, H, L) @ (B, L, D) = (B, H, D): Z p_h
    return np.einsum("hd,bhd->b", ov, u), p, u  # (B,)


def icl_regression(
    z: Array, z_q: Array, kq: Array, ov: Array, *, return_weights: bool = False
) -> Array | tuple[Array, Array]:
    r"""The one-layer multi-head softmax attention prediction (see the module docstring).

    $$
    \hat y = \sum_h \mathrm{OV}_h \sum_\ell p_{h\ell}\, z_\ell, \qquad
    p_h = \operatorname{softmax}_\ell\big(z_\ell^\top \mathrm{KQ}_h z_q\big).
    $$

    Args:
        z: context tokens ``(B, L, D)``, ``D = d + 1``, rows $(x_\ell, y_\ell)$ (see :func:`tokens`).
        z_q: query tokens ``(B, D)``, $(x_q, 0)$.
        kq: merged key-query matrices ``(H, D, D)``; any score scale is part of them.
        ov: merged output-value rows ``(H, D)``.
        return_weights: also return the attention weights ``(B, H, L)``.

    Returns:
        the predictions ``(B,)`` in the inputs' dtype, and with ``return_weights`` the pair
        ``(y_hat, p)``.
    """
    _check_model(z, z_q, kq, ov)
    y_hat, p, _ = _forward(z, z_q, kq, ov)
    return (y_hat, p) if return_weights else y_hat


def loss_and_grads(z: Array, z_q: Array, y_q: Array, params: ICLParams) -> tuple[float, ICLParams]:
    r"""Mean squared error $\ell = \frac1B \sum_b (\hat y_b - y_{q,b})^2$ and its gradients.

    With $r_b = \frac2B(\hat y_b - y_{q,b})$, head outputs $u_{bh} = Z_b p_{bh}$ and
    $v_{bh\ell} = \mathrm{OV}_h z_{b\ell}$, the softmax's Jacobian gives

    $$
    \frac{\partial \ell}{\partial \mathrm{OV}_h} = \sum_b r_b u_{bh}, \qquad
    g_{bh\ell} = p_{bh\ell}\big(v_{bh\ell} - \textstyle\sum_{\ell'} p_{bh\ell'} v_{bh\ell'}\big),
    \qquad
    \frac{\partial \ell}{\partial \mathrm{KQ}_h} = \sum_b r_b \Big(\sum_\ell g_{bh\ell}
    z_{b\ell}\Big) z_{q,b}^\top .
    $$

    ``z (B, L, D)``, ``z_q (B, D)``, ``y_q (B,)``. Returns ``(loss, grads)`` with the gradients
    in an :class:`ICLParams` of the weights' shapes.
    """
    _check_model(z, z_q, params.kq, params.ov)
    y_hat, p, u = _forward(z, z_q, params.kq, params.ov)
    r = 2.0 * (y_hat - y_q) / len(y_q)  # (B,)
    v = params.ov @ z.swapaxes(1, 2)  # (H, D) @ (B, D, L) = (B, H, L): OV_h z_l
    g = p * (v - (p * v).sum(axis=-1, keepdims=True))  # (B, H, L)
    grad_ov = np.einsum("b,bhd->hd", r, u)  # (H, D)
    gz = (r[:, None, None] * g) @ z  # (B, H, L) @ (B, L, D) = (B, H, D)
    grad_kq = np.einsum("bhd,be->hde", gz, z_q)  # (H, D, D)
    return float(np.mean((y_hat - y_q) ** 2)), ICLParams(grad_kq, grad_ov)


def train(
    *,
    d: int = 5,
    heads: int = 4,
    context: int = 40,
    noise: float = 0.1,
    steps: int = 2000,
    batch: int = 256,
    lr: float = 0.02,
    init_std: float = 0.02,
    seed: int = 0,
) -> Training:
    r"""Train the model from random weights with Adam on fresh tasks every step (NumPy only).

    Adam with $\beta_1 = 0.9$, $\beta_2 = 0.999$, $\epsilon = 10^{-8}$ and bias correction, as
    ``torch.optim.Adam``, its step ``lr`` decayed to 0 along a cosine (so that the end of a short
    run is not dominated by the noise of the fresh batches); gradients from
    :func:`loss_and_grads`. The official notebook's data
    (``d``, ``context`` $= 8d$, ``noise`` $= 0.1$) and head count (4) are the defaults. The run
    is a deterministic function of ``seed`` (weights and tasks come from one generator). The
    defaults take a few seconds on one CPU core.

    Returns:
        :class:`Training`: the final :class:`ICLParams`, the training loss of every step
        ``(steps,)`` and the wall time.
    """
    for name, value in (("heads", heads), ("steps", steps)):
        _checks.positive_int(name, value)
    if not lr > 0:
        raise ParameterError(f"lr: expected a learning rate > 0, got {lr!r}")
    rng = np.random.default_rng(seed)
    params = ICLParams.init(heads, d, std=init_std, rng=rng)
    weights = [params.kq.copy(), params.ov.copy()]
    first = [np.zeros_like(w) for w in weights]  # Adam's moment estimates
    second = [np.zeros_like(w) for w in weights]
    losses = np.empty(steps)
    start = time.perf_counter()
    for t in range(1, steps + 1):
        task = sample_tasks(batch, context, d, noise=noise, rng=rng)
        z, z_q = tokens(task.x, task.y, task.x_q)
        rate = lr * 0.5 * (1 + np.cos(np.pi * (t - 1) / steps))  # cosine decay to 0
        losses[t - 1], grads = loss_and_grads(z, z_q, task.y_q, ICLParams(*weights))
        for w, m, s, g in zip(weights, first, second, (grads.kq, grads.ov), strict=True):
            m *= 0.9
            m += 0.1 * g
            s *= 0.999
            s += 0.001 * g**2
            w -= rate * (m / (1 - 0.9**t)) / (np.sqrt(s / (1 - 0.999**t)) + 1e-8)
    return Training(ICLParams(*weights), losses, time.perf_counter() - start)


def structured(omega: Array, mu: Array, d: int) -> ICLParams:
    r"""The paper's pattern: $\mathrm{KQ}_h = \omega_h \operatorname{diag}(I_d, 0)$ and
    $\mathrm{OV}_h = \mu_h e_{d+1}^\top$, from ``omega (H,)`` and ``mu (H,)``."""
    omega, mu = np.asarray(omega, dtype=np.float64), np.asarray(mu, dtype=np.float64)
    if omega.ndim != 1 or mu.shape != omega.shape:
        raise ShapeError(f"omega, mu: expected two (H,) arrays, got {omega.shape} and {mu.shape}")
    _checks.positive_int("d", d)
    block = np.diag(np.r_[np.ones(d), 0.0])  # (D, D): diag(I_d, 0)
    last = np.r_[np.zeros(d), 1.0]  # (D,): e_{d+1}
    return ICLParams(omega[:, None, None] * block, mu[:, None] * last)  # (H, D, D), (H, D)


def debiased_gd(x: Array, y: Array, x_q: Array, step: float | Array = 1.0) -> Array:
    r"""One debiased gradient-descent step: $\hat y = \eta \frac1L \sum_\ell y_\ell
    (x_\ell - \bar x)^\top x_q$, $\bar x = \frac1L \sum_\ell x_\ell$.

    ``x (B, L, d)``, ``y (B, L)``, ``x_q (B, d)``; ``step`` $\eta$ a number or ``(B,)``.
    Returns ``(B,)``.
    """
    _check_prompt(x, y, x_q)
    centred = x - x.mean(axis=1, keepdims=True)  # (B, L, d)
    return step * np.einsum("bl,bld,bd->b", y, centred, x_q) / x.shape[1]  # (B,)


def ridge(x: Array, y: Array, x_q: Array, lam: float) -> Array:
    r"""Ridge regression on the context: $\hat y = x_q^\top (X^\top X + \lambda I)^{-1} X^\top y$.

    ``x (B, L, d)``, ``y (B, L)``, ``x_q (B, d)``; $\lambda = \sigma^2 d$ is Bayes optimal for
    the prior $\beta \sim \mathcal N(0, I_d/d)$. Returns ``(B,)``.
    """
    _check_prompt(x, y, x_q)
    if not lam >= 0:
        raise ParameterError(f"lam: expected a ridge penalty >= 0, got {lam!r}")
    gram = np.einsum("bld,ble->bde", x, x) + lam * np.eye(x.shape[-1])  # (B, d, d)
    beta = np.linalg.solve(gram, np.einsum("bld,bl->bd", x, y)[..., None])[..., 0]  # (B, d)
    return np.einsum("bd,bd->b", beta, x_q)  # (B,)


def pattern_scores(params: ICLParams) -> dict[str, Any]:
    r"""How far weights are from the paper's pattern; every score is 0 for :func:`structured`.

    Returns a dict with ``omega (H,)``, the mean of each $\mathrm{KQ}_h$'s $x$-block diagonal,
    and ``mu (H,)``, each $\mathrm{OV}_h$'s last entry, and the relative scores (norms are
    Frobenius, over all heads):

    * ``kq_off_pattern``: $\lVert \mathrm{KQ} - \omega \operatorname{diag}(I_d, 0) \rVert /
      \lVert \mathrm{KQ} \rVert$ over the first $d$ columns (off-diagonal entries, unequal
      diagonal, the $y$ row). The last column multiplies the query token's $y$ entry, which is
      0: it never changes the prediction, gets no gradient and keeps its initial values, so it is
      left out;
    * ``ov_off_last``: the norm of the $\mathrm{OV}_h$ entries other than the last, over
      $\lVert \mathrm{OV} \rVert$;
    * ``ov_sum``: $|\sum_h \mu_h| / \sum_h |\mu_h|$ (0 when zero-sum).
    """
    kq, ov = np.asarray(params.kq), np.asarray(params.ov)
    d = kq.shape[-1] - 1
    omega = np.trace(kq[:, :d, :d], axis1=1, axis2=2) / d  # (H,)
    mu = ov[:, -1]  # (H,)
    ideal = structured(omega, mu, d)
    return {
        "omega": omega,
        "mu": mu,
        "kq_off_pattern": float(
            np.linalg.norm((kq - ideal.kq)[..., :d]) / np.linalg.norm(kq[..., :d])
        ),
        "ov_off_last": float(np.linalg.norm(ov[:, :d]) / np.linalg.norm(ov)),
        "ov_sum": float(abs(mu.sum()) / np.abs(mu).sum()),
    }
