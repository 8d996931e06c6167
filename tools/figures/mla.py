"""Multi-head latent attention (notebook 04, `dsv3_lite.attention.MLA`): the naive and the absorbed form side by side.

Left, `attn_impl="naive"`: the latent is expanded by `wkv_b` into per-head keys and values, and those are cached.
Right, `attn_impl="absorb"`: `W^UK` is folded into the query and `W^UV` applied after the weighted sum, so the cache
holds only the normalised latent and the rotated RoPE key. Widths are read from `ModelArgs.preset("671B")`.
"""

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch

from dsv3_lite.config import ModelArgs

A = ModelArgs.preset("671B")
D, H, DQ, DC = A.dim, A.n_heads, A.q_lora_rank, A.kv_lora_rank
NOPE, ROPE, DV, QK = A.qk_nope_head_dim, A.qk_rope_head_dim, A.v_head_dim, A.qk_head_dim
CKV, KR, WUK, WUV = "$c^{KV}$", "$k^{R}$", "$W^{UK}$", "$W^{UV}$"

# (fill, edge) per kind of box: query path, key/value path, cache, attention, input/output, note
STYLE = {"q": ("#dce6f2", "#4f6f94"), "kv": ("#dfeedd", "#55805a"), "cache": ("#fbe7bd", "#b07d1a"),
         "att": ("#e9e2f1", "#6f5a8c"), "io": ("#eeeeee", "#666666"), "note": ("#ffffff", "#888888")}
PANEL_W, PANEL_H = 5.4, 8.6  # inches (one data unit = one inch)


def box(ax, x, y, w, h, text, kind, size=9.5, bold=False, dashed=False):
    """A rounded box centred at (x, y), w × h inches, with centred text; returns its (left, right, bottom, top)."""
    fill, edge = STYLE[kind]
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.07",
                                facecolor=fill, edgecolor=edge, linewidth=1.6 if kind == "cache" else 1.0,
                                linestyle=(0, (4, 2.5)) if dashed else "-"))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, fontweight="bold" if bold else "normal",
            linespacing=1.25)
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2


def arrow(ax, start, end, label=None, dashed=False):
    """An arrow from `start` to `end` (inches), with an optional label beside its middle."""
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color="#444444", lw=1.0,
                                                          shrinkA=0, shrinkB=0, mutation_scale=11,
                                                          linestyle=(0, (3, 2)) if dashed else "-"))
    if label:
        ax.text((start[0] + end[0]) / 2 + 0.06, (start[1] + end[1]) / 2, label, fontsize=9, va="center",
                color="#444444")


def common(ax, title, subtitle):
    """Title, the input x, and the two projections both forms share: the query latent and `wkv_a`."""
    ax.set_xlim(0, PANEL_W)
    ax.set_ylim(0, PANEL_H)
    ax.axis("off")
    ax.text(PANEL_W / 2, 8.45, title, ha="center", va="center", fontsize=11, fontweight="bold")
    ax.text(PANEL_W / 2, 8.17, subtitle, ha="center", va="center", fontsize=9.5, color="#444444")
    box(ax, 2.7, 7.7, 2.4, 0.4, f"x   [dim = {D}]", "io")
    arrow(ax, (2.0, 7.5), (1.3, 7.12))
    arrow(ax, (3.4, 7.5), (4.0, 7.12))
    box(ax, 1.3, 6.9, 2.3, 0.42, f"wq_a   {D} → {DQ}", "q")
    box(ax, 1.3, 6.25, 2.3, 0.42, f"q_norm (RMSNorm)   {DQ}", "q")
    box(ax, 1.3, 5.6, 2.3, 0.42, f"wq_b   {DQ} → {H}·{QK}", "q")
    for a, b in ((6.69, 6.46), (6.04, 5.81)):
        arrow(ax, (1.3, a), (1.3, b))
    arrow(ax, (0.85, 5.39), (0.75, 5.03))
    arrow(ax, (1.75, 5.39), (1.9, 5.03))
    box(ax, 0.75, 4.75, 1.3, 0.56, f"q_nope ($q^C$)\n{H} × {NOPE}", "q")
    box(ax, 1.9, 4.75, 1.0, 0.56, f"RoPE(q_pe)\n{H} × {ROPE}", "q")
    box(ax, 4.0, 6.9, 2.5, 0.42, f"wkv_a   {D} → {DC} + {ROPE}", "kv")
    arrow(ax, (3.45, 6.69), (3.35, 6.31))
    arrow(ax, (4.55, 6.69), (4.7, 6.31))
    box(ax, 3.35, 6.0, 1.3, 0.62, f"kv_norm\n→ {CKV}   {DC}", "kv")
    box(ax, 4.7, 6.0, 1.25, 0.62, f"RoPE(k_pe) → {KR}\n{ROPE}, all heads", "kv", size=9)


def naive(ax):
    common(ax, 'Naive form  (attn_impl = "naive")', "training and prefill: K and V expanded per head")
    arrow(ax, (3.35, 5.69), (3.35, 5.46))
    box(ax, 3.35, 5.2, 1.45, 0.52, f"wkv_b   {DC} →\n{H}·({NOPE} + {DV})", "kv")
    arrow(ax, (3.0, 4.94), (2.95, 4.67))
    arrow(ax, (3.7, 4.94), (3.85, 4.67))
    box(ax, 2.95, 4.45, 0.95, 0.44, f"k_nope\n{H} × {NOPE}", "kv", size=9)
    box(ax, 3.85, 4.45, 0.8, 0.44, f"v\n{H} × {DV}", "kv", size=9)
    arrow(ax, (4.7, 5.69), (4.7, 4.36))
    ax.text(4.76, 4.95, "copied\nto each\nhead", fontsize=9, va="center", color="#444444")
    left, right, _, top = box(ax, 3.85, 3.55, 2.95, 1.05, "", "cache", dashed=True)
    ax.text(left + 0.1, top - 0.17, "KV cache, per token and layer", fontsize=9.5, fontweight="bold", va="center")
    ax.text(3.85, 3.43, f"K = [k_nope ; {KR}]   {H} × {QK}\nV   {H} × {DV}\n"
            f"= {H * (QK + DV):,} values", ha="center", va="center", fontsize=9.5, linespacing=1.3)
    for x in (2.95, 3.85, 4.7):
        arrow(ax, (x, 4.23 if x < 4.6 else 4.36), (x, top))
    box(ax, 2.7, 2.25, 5.0, 0.62, f"per head: softmax(scale · [q_nope ; q_pe] · Kᵀ + mask) · V\n"
        f"→ o   {H} × {DV}", "att")
    arrow(ax, (0.75, 4.47), (0.75, 2.56))
    arrow(ax, (1.9, 4.47), (1.9, 2.56))
    arrow(ax, (3.85, 3.03), (3.85, 2.56))
    arrow(ax, (2.7, 1.94), (2.7, 1.66))
    box(ax, 2.7, 1.45, 2.4, 0.42, f"wo   {H}·{DV} → {D}", "io")
    arrow(ax, (2.7, 1.24), (2.7, 0.96))
    box(ax, 2.7, 0.75, 2.4, 0.42, f"output   [{D}]", "io")
    ax.text(2.7, 0.22, f"scale = 1/√{QK}  (× m² with YaRN)", ha="center", fontsize=9, color="#444444")


def absorbed(ax):
    common(ax, 'Absorbed form  (attn_impl = "absorb")', "decoding: only the latent and the RoPE key cached")
    left, right, bottom, top = box(ax, 4.0, 4.55, 2.7, 1.05, "", "cache", dashed=True)
    ax.text(left + 0.1, top - 0.17, "KV cache, per token and layer", fontsize=9.5, fontweight="bold", va="center")
    ax.text(4.0, 4.43, f"{CKV}  {DC}  +  {KR}  {ROPE}\n= {DC + ROPE} values, shared by all heads", ha="center",
            va="center", fontsize=9.5, linespacing=1.3)
    arrow(ax, (3.35, 5.69), (3.35, top))
    arrow(ax, (4.7, 5.69), (4.7, top))
    arrow(ax, (0.75, 4.47), (0.75, 4.06))
    box(ax, 0.9, 3.7, 1.6, 0.7, f"q_nope · {WUK}\n→ $\\tilde{{q}}$   {H} × {DC}\n(latent space)", "q", size=9)
    box(ax, 2.45, 2.7, 4.5, 0.62, "per head and cached token t:\n"
        "scale · ($\\tilde{q}$ · $c^{KV}_t$ + q_pe · $k^R_t$) + mask → softmax → p$_t$", "att")
    arrow(ax, (0.9, 3.35), (0.9, 3.01))
    arrow(ax, (1.9, 4.47), (1.9, 3.01))
    arrow(ax, (3.6, bottom), (3.6, 3.01))
    arrow(ax, (2.45, 2.39), (2.45, 2.12))
    box(ax, 2.7, 1.9, 3.4, 0.44, f"ō = Σ$_t$ p$_t$ $c^{{KV}}_t$   {H} × {DC}", "att")
    ax.annotate("", xy=(4.4, 1.9), xytext=(5.0, bottom), arrowprops=dict(
        arrowstyle="-|>", color="#444444", lw=1.0, shrinkA=0, shrinkB=0, mutation_scale=11,
        connectionstyle="angle,angleA=-90,angleB=0,rad=0.1"))
    arrow(ax, (2.7, 1.68), (2.7, 1.5))
    box(ax, 2.7, 1.3, 2.6, 0.4, f"ō · {WUV}  →  o   {H} × {DV}", "att")
    arrow(ax, (2.7, 1.1), (2.7, 0.92))
    box(ax, 2.7, 0.72, 2.4, 0.4, f"wo   {H}·{DV} → {D}  → output", "io")
    box(ax, 2.7, 0.17, 5.2, 0.34, f"{WUK}, {WUV}: per head the two halves of wkv_b  [{H}·({NOPE} + {DV}), {DC}]",
        "note", size=9, dashed=True)


def figure() -> Figure:
    fig = Figure(figsize=(2 * PANEL_W + 0.3, PANEL_H))
    naive(fig.add_axes((0, 0, PANEL_W / (2 * PANEL_W + 0.3), 1)))
    absorbed(fig.add_axes(((PANEL_W + 0.3) / (2 * PANEL_W + 0.3), 0, PANEL_W / (2 * PANEL_W + 0.3), 1)))
    fig.add_artist(Line2D([0.5, 0.5], [0.03, 0.97], color="#bbbbbb", lw=1.0))  # between the panels
    return fig


if __name__ == "__main__":
    figure().savefig("/tmp/mla.png", dpi=110, bbox_inches="tight")
