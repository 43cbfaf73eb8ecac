"""Certified-accuracy reports: the markdown table and the CA_r plot shared by run and compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpcert.certification.certify import Certificates, certified_accuracy, radius_summary

#: Radii shown in tables (those up to the largest certified radius).
TABLE_RADII = (0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 300, 400, 500, 600, 800, 1000)


def table_radii(results: dict[str, Certificates]) -> list[int]:
    top = max(max(int(c.radius.max()) for c in results.values()), 3)
    return [r for r in TABLE_RADII if r <= top]


def ca_table(results: dict[str, Certificates], labels: np.ndarray,
             curves: dict[str, object] | None = None) -> list[str]:
    """Markdown rows: method, clean accuracy, CA@r for the table radii, median and max radius.
    Methods whose name starts with "paper" are marked as such. ``curves`` adds rows for
    certified-accuracy bounds that are not pointwise: name -> function of an array of radii."""
    radii = table_radii(results)
    lines = ["| method | clean acc | " + " | ".join(f"CA@{r}" for r in radii)
             + " | median r | max r |", "|" + "---|" * (len(radii) + 4)]
    for name, cert in results.items():
        ca = certified_accuracy(cert, labels, np.array(radii))
        s = radius_summary(cert, labels)
        label = name + (" (paper)" if name.startswith("paper") else "")
        lines.append(f"| {label} | {s['accuracy']:.3f} | " + " | ".join(f"{a:.3f}" for a in ca)
                     + f" | {s['median_radius']:g} | {s['max_radius']} |")
    for name, curve in (curves or {}).items():
        ca = curve(np.array(radii))
        lines.append(f"| {name} | - | " + " | ".join(f"{a:.3f}" for a in ca) + " | - | - |")
    return lines


def plot_curves(results: dict[str, Certificates], labels: np.ndarray, path: Path,
                title: str, curves: dict[str, object] | None = None,
                xlabel: str | None = None) -> None:
    """CA_r against r for every method (paper reproductions dashed), written atomically.
    Without matplotlib: no plot, and an :class:`~dpcert.errors.InputWarning` naming the
    extra to install (the tables are written either way)."""
    try:
        import matplotlib
    except ImportError:
        import warnings

        from dpcert.errors import InputWarning

        warnings.warn(f"{path.name} not drawn: plots need matplotlib: pip install "
                      "'dpcert[plots]'", InputWarning, stacklevel=2)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpcert.store import atomic_write

    fig, ax = plt.subplots(figsize=(7, 5))
    top = max(int(c.radius.max()) for c in results.values()) + 1
    rs = np.arange(0, max(top, 2) + 1)
    colours: dict[str, str] = {}  # a defence's envelope is drawn in its defence's colour
    for name, cert in results.items():
        paper = name.startswith("paper")
        (line,) = ax.step(rs, certified_accuracy(cert, labels, rs), "--" if paper else "-",
                          where="post", label=name + (" (unsound)" if paper else ""))
        colours.setdefault(name.split(" ")[0], line.get_color())
    for name, curve in (curves or {}).items():
        style: dict = {"linestyle": ":"}
        if name.endswith(" envelope") and name.split(" ")[0] in colours:
            style["color"] = colours[name.split(" ")[0]]
        elif name.startswith("envelope"):
            style = {"color": "black", "linestyle": "--", "linewidth": 2.0, "alpha": 0.55}
        ax.step(rs, curve(rs), where="post", label=name, **style)
    ax.set_xlabel(xlabel or "radius r (inserted + deleted training examples)")
    ax.set_ylabel("certified accuracy")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    # below the axes: with many defences an inner legend hides the curves' crossings
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda h: fig.savefig(h, format="png", dpi=120))
    plt.close(fig)
