"""DeepSeekMoE's sorted dispatch (notebook 06, `dsv3_lite.moe.experts_sorted`) on the notebook's small example.

4 tokens, k = 2, 3 experts, `indices = [[2, 0], [0, 1], [2, 1], [0, 2]]`: the gate gives each token k experts; the
N·k (token, expert) pairs are sorted by expert (stable argsort, rows per expert counted), the token rows gathered in
that order, each weight matrix run as one grouped GEMM over the experts' segments (w1, w3 → SwiGLU → × gate weight
→ w2), and the rows added back to their tokens with `index_add_`; the shared expert's output is added last. The
permutation is computed here with the same calls as `experts_sorted`.
"""

import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

INDICES = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])  # [N, k], the example of notebook 06, section 9
N, K = INDICES.shape
E = int(INDICES.max()) + 1
FLAT = INDICES.flatten()                                      # [N*k] expert of each (token, slot) pair
ORDER = FLAT.argsort(stable=True)                             # [N*k] pairs grouped by expert
COUNTS = torch.zeros(E, dtype=torch.long).scatter_add_(0, FLAT, torch.ones_like(FLAT))
OFFS = COUNTS.cumsum(0)                                       # [E] end row of each expert's segment
TOKEN = ORDER // K                                            # [N*k] source token of each sorted row

TOKEN_COLORS = ("#9dbbd9", "#efbf8f", "#a8d1a1", "#c9b2d9")   # one per token
EXPERT_COLORS = ("#f3e8c8", "#d6e6e6", "#efd9d9")             # one per expert (paler)
EDGE, INK = "#5a5a5a", "#333333"
PITCH, ROW_H, GAP, TOP = 0.42, 0.34, 0.16, 3.9                # row layout, inches


def rect(ax, x0, y, w, text, color, h=ROW_H, size=9.5, edge=EDGE):
    """A row (or block) of width w centred vertically at y, left edge x0, with centred text."""
    ax.add_patch(FancyBboxPatch((x0, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.05",
                                facecolor=color, edgecolor=edge, linewidth=0.9))
    ax.text(x0 + w / 2, y, text, ha="center", va="center", fontsize=size, color="black", linespacing=1.3)


def arrow(ax, start, end, color=INK, style="-|>"):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=color, lw=1.0, shrinkA=0,
                                                          shrinkB=0, mutation_scale=10))


def header(ax, x, text):
    ax.text(x, TOP + 0.2, text, ha="center", va="bottom", fontsize=9.5, color=INK, linespacing=1.3)


def row_y(i, group):
    """Centre of row i of a column of N·k rows, with a gap before each new group."""
    return TOP - PITCH / 2 - i * PITCH - group * GAP


def figure() -> Figure:
    fig = Figure(figsize=(11.2, 5.9))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 11.2)
    ax.set_ylim(-0.7, 5.2)
    ax.axis("off")
    ax.text(5.6, 5.0, f"Sorted dispatch (experts_sorted): N = {N} tokens, k = {K}, E = {E} experts",
            ha="center", va="center", fontsize=11, fontweight="bold")

    # tokens x [N, D], centred on the N·k rows
    pair_y = [row_y(p, p // K) for p in range(N * K)]
    tok_y = [(pair_y[K * t] + pair_y[K * t + K - 1]) / 2 for t in range(N)]
    header(ax, 0.6, "tokens\nx  [N, D]")
    for t in range(N):
        rect(ax, 0.2, tok_y[t], 0.8, f"x[{t}]", TOKEN_COLORS[t])

    # the gate
    gate_y = (pair_y[0] + pair_y[-1]) / 2
    rect(ax, 1.3, gate_y, 1.75, "Gate(x)\n\ns = sigmoid(x · W$_{gate}^T$)\ntop-k of s + bias,\nin the best groups\n"
         "→ indices [N, k]\n\nweights [N, k]:\nchosen s, normalised\n× route_scale", "#ffffff", h=3.0, size=9)
    for t in range(N):  # every token's row goes through the gate, which gives it k (expert, weight) pairs
        arrow(ax, (1.0, tok_y[t]), (1.3, tok_y[t]))
        arrow(ax, (3.05, tok_y[t]), (3.3, tok_y[t]))

    # the (token, expert) pairs in token order: indices.flatten()
    header(ax, 3.7, "pairs (t, e)\nindices.flatten()")
    for p in range(N * K):
        rect(ax, 3.3, pair_y[p], 0.4, f"t{p // K}", TOKEN_COLORS[p // K])
        rect(ax, 3.7, pair_y[p], 0.4, f"e{int(FLAT[p])}", EXPERT_COLORS[int(FLAT[p])])

    # argsort: pair ORDER[i] becomes sorted row i; the rows x[TOKEN[i]] are gathered in that order
    expert_of_row = FLAT[ORDER].tolist()
    sort_y = [row_y(i, expert_of_row[i]) for i in range(N * K)]
    for i, p in enumerate(ORDER.tolist()):
        arrow(ax, (4.1, pair_y[p]), (4.95, sort_y[i]), color=TOKEN_COLORS[p // K], style="-")
    ax.text(4.52, sort_y[-1] - 0.25, "argsort\n(stable)", ha="center", va="top", fontsize=9, color=INK)
    header(ax, 5.35, f"xs = x[order // k]\ncounts {COUNTS.tolist()}")
    for i in range(N * K):
        rect(ax, 4.95, sort_y[i], 0.8, f"x[{int(TOKEN[i])}]", TOKEN_COLORS[int(TOKEN[i])])

    # one grouped GEMM per weight matrix: each expert's segment of rows times its own weights
    header(ax, 7.25, f"grouped GEMMs, one per matrix:\nsegments end at offs = {OFFS.tolist()}")
    start = 0
    for e, n in enumerate(COUNTS.tolist()):
        if n == 0:
            continue
        top, bottom = sort_y[start] + ROW_H / 2, sort_y[start + n - 1] - ROW_H / 2
        rect(ax, 6.05, (top + bottom) / 2, 2.4, f"expert {e}:  w1[{e}], w3[{e}] → SwiGLU\n"
             f"× gate weight → w2[{e}]", EXPERT_COLORS[e], h=top - bottom, size=9)
        arrow(ax, (5.75, (top + bottom) / 2), (6.05, (top + bottom) / 2))
        arrow(ax, (8.45, (top + bottom) / 2), (8.7, (top + bottom) / 2))
        start += n

    # ys rows, then index_add_ back to each token's row
    header(ax, 9.1, "ys  [N·k, D]")
    out_y = tok_y
    for i in range(N * K):
        t = int(TOKEN[i])
        rect(ax, 8.7, sort_y[i], 0.8, f"→ y[{t}]", TOKEN_COLORS[t])
        arrow(ax, (9.5, sort_y[i]), (10.2, out_y[t]), color=TOKEN_COLORS[t], style="-")
    ax.text(9.85, sort_y[-1] - 0.25, "index_add_\n(by token)", ha="center", va="top", fontsize=9, color=INK)
    header(ax, 10.6, "MoE output\ny  [N, D]")
    for t in range(N):
        rect(ax, 10.2, out_y[t], 0.8, f"y[{t}]", TOKEN_COLORS[t])

    # the shared expert sees every token
    rect(ax, 6.05, -0.45, 2.4, "shared_experts(x): every token", "#ffffff", h=0.32, size=9)
    ax.annotate("", xy=(6.05, -0.45), xytext=(0.6, tok_y[-1] - ROW_H / 2), arrowprops=dict(
        arrowstyle="-|>", color=INK, lw=1.0, shrinkA=0, shrinkB=0, mutation_scale=10,
        connectionstyle="angle,angleA=-90,angleB=0,rad=0"))
    ax.annotate("", xy=(10.6, out_y[-1] - ROW_H / 2), xytext=(8.45, -0.45), arrowprops=dict(
        arrowstyle="-|>", color=INK, lw=1.0, shrinkA=0, shrinkB=0, mutation_scale=10,
        connectionstyle="angle,angleA=0,angleB=-90,rad=0"))
    ax.text(10.72, -0.1, "+", ha="left", va="center", fontsize=11, fontweight="bold", color=INK)
    return fig


if __name__ == "__main__":
    figure().savefig("/tmp/moe.png", dpi=110, bbox_inches="tight")
