"""The progress bar: steps, the running training loss, and an ETA that counts the evaluations."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm


def evaluations_left(step: int, total: int, eval_every: int) -> int:
    """How many of the steps after `step` up to `total` evaluate (every eval_every-th, and the last)."""
    if step >= total:
        return 0
    return total // eval_every - step // eval_every + (total % eval_every != 0)


def eta_s(steps_done: int, steps_left: int, elapsed_s: float, eval_s: float, n_evals: int,
          evals_left: int) -> tuple[float, bool]:
    """(seconds to the end, whether the evaluations still to come are in it).

    The training steps' rate is measured without the evaluations (`eval_s` spent in `n_evals`
    of them since the bar opened); each evaluation left costs their mean. Before the first one
    nothing says what one costs: the second value is then False (unless none is left)."""
    train_rate = max(elapsed_s - eval_s, 0.0) / steps_done if steps_done else 0.0
    seconds = steps_left * train_rate
    if n_evals:
        seconds += evals_left * eval_s / n_evals
    return seconds, bool(n_evals) or evals_left == 0


class ProgressBar(tqdm):
    """tqdm, whose ETA adds the evaluations to come and whose postfix always holds a loss:
    the running mean since the last evaluation (`running_loss`), read only when the bar is drawn
    (at most every `mininterval` s: on a GPU each read waits for the queued steps)."""

    def __init__(self, total: int, initial: int, eval_every: int, running_loss: Callable[[], float | None],
                 disable: bool) -> None:
        self.eval_every, self.running_loss = eval_every, running_loss
        self.eval_s, self.n_evals, self.last = 0.0, 0, ""
        super().__init__(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True,
                         mininterval=0.5, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{eta}{postfix}]")

    def evaluated(self, eval_s: float, shown: str) -> None:
        """An evaluation took `eval_s`; `shown`: its results, kept on the bar until the next one."""
        self.eval_s += eval_s
        self.n_evals += 1
        self.last = shown
        self.set_postfix_str("", refresh=False)  # the "evaluating..." note

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        n, total = d["n"], d["total"] or d["n"]
        seconds, complete = eta_s(n - self.initial, total - n, d["elapsed"], self.eval_s, self.n_evals,
                                  evaluations_left(n, total, self.eval_every))
        d["eta"] = self.format_interval(seconds) + ("" if complete else " + evaluations")
        loss = self.running_loss()
        parts = [f"loss {loss:.3f}" if loss is not None else "", self.last, d.get("postfix") or ""]
        d["postfix"] = ", ".join(p for p in parts if p)  # format_meter puts the ", " before it
        return d
