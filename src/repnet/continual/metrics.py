"""What a continual run measures: the accuracy matrix's summary (average accuracy, backward transfer,
forgetting) and its printed form.

``acc[after][task]`` is the test accuracy of ``task`` after training task ``after`` (None before the
task was seen): average accuracy is the last row's mean, backward transfer the mean change of each
earlier task from just after it was learned to the end, forgetting the mean drop from each task's
best to its last accuracy.
"""
from __future__ import annotations



# ----------------------------------------------------------------------------- metrics
def continual_metrics(acc: list[list[float | None]]) -> dict:
    """From ``acc[i][j]`` (test accuracy on task j after training task i; None for j > i):

    * ``average_accuracy``: mean of the last row;
    * ``backward_transfer`` (Lopez-Paz & Ranzato 2017): mean over j < T-1 of acc[T-1][j] - acc[j][j]
      (negative = forgetting);
    * ``forgetting`` (Chaudhry et al. 2018): per task j < T-1, max over i < T-1 of acc[i][j] minus
      acc[T-1][j]; ``average_forgetting`` their mean (None with a single task).
    """
    T = len(acc)
    last = acc[-1]
    old = range(T - 1)
    forgetting = [max(acc[i][j] for i in range(j, T - 1)) - last[j] for j in old]
    return {
        "average_accuracy": sum(last) / T,
        "backward_transfer": sum(last[j] - acc[j][j] for j in old) / (T - 1) if T > 1 else None,
        "forgetting": forgetting,
        "average_forgetting": sum(forgetting) / len(forgetting) if forgetting else None,
    }


def format_matrix(results: dict) -> str:
    """The accuracy matrix (rows: after training task i; columns: task j) and the summary."""
    names = results["tasks"]
    w = max(12, *(len(n) + 2 for n in names))
    lines = [f"{results['method']}{' (naive)' if results['naive'] else ''} on {results['backbone']}: "
             "test accuracy after each task",
             "after \\ on".ljust(w) + "".join(n.rjust(w) for n in names)]
    for n, row in zip(names, results["acc"]):
        lines.append(n.ljust(w) + "".join(("-" if a is None else f"{a:.4f}").rjust(w) for a in row[: len(names)]))
    bwt, fgt = results["backward_transfer"], results["average_forgetting"]
    lines.append(f"average accuracy {results['average_accuracy']:.4f}"
                 + ("" if bwt is None else f" | backward transfer {bwt:+.4f} | average forgetting {fgt:.4f}"))
    st = results["storage"]
    lines.append(f"storage: {st['total_bytes'] / 1e6:.2f} MB shared (backbone {st['backbone_bytes'] / 1e6:.2f} MB + "
                 f"tasks {sum(st['task_bytes'].values()) / 1e6:.3f} MB) vs {st['separate_finetuned_bytes'] / 1e6:.2f} MB "
                 f"for {len(names)} separately fine-tuned networks")
    return "\n".join(lines)
