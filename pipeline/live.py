"""What a training run reports: the DVCLive curves (train/* per iteration, val/* per validation),
the progress bar, a plain-text log (train.log: the start-up lines, a line every log_interval
iterations, validations, the end) and the figures of metrics/train.json, kept as the run goes so a resumed run
reports the whole run without keeping every iteration's record."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

VAL_METRICS = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


class RunningSummary:
    """The figures of metrics/train.json, two step times among them:

    iter_time_s, the seed's measure (mmcv's per-iteration `time`, which the Ascend port's
    test/train_performance_8p.sh averages): the mean wall time from the end of one iteration to the
    end of the next, so waiting for the batch, the step, logging, validation and periodic
    checkpoints all count (the save after the last iteration does not); over every iteration but
    the first of each process (its interval holds the start-up). fps = global batch / iter_time_s,
    the seed's FPS. `end_iteration(now)` marks each iteration's end.

    step_time_s, the step alone: the mean of `add`'s step times (from asking for the batch to the
    schedule's step: the data wait counts; logging, validation and checkpoints do not) without the
    first `warmup` iterations (the first one for runs of up to 2 x `warmup`); samples_per_s =
    global batch / step_time_s.

    final_loss: mean of the last `tail` finite losses. Holds the first `warmup` step times, the sum
    and count of all, the sum and count of the iteration intervals and the last `tail` losses."""

    def __init__(self, warmup: int = 5, tail: int = 10):
        self.warmup, self.tail = warmup, tail
        self.iteration = 0
        self.count = 0
        self.time_sum = 0.0
        self.first_times: list[float] = []
        self.last_losses: list[float] = []
        self.interval_sum = 0.0
        self.interval_count = 0
        self.last_end: float | None = None  # this process's last iteration end: not saved on resume

    def add(self, iteration: int, loss: float, step_time: float) -> None:
        self.iteration = iteration
        self.count += 1
        self.time_sum += step_time
        if len(self.first_times) < self.warmup:
            self.first_times.append(step_time)
        self.last_losses = (self.last_losses + [loss])[-self.tail :]

    def end_iteration(self, now: float) -> None:
        """An iteration ended at `now` (seconds on a monotonic clock); the first call of a process
        only starts the clock."""
        if self.last_end is not None:
            self.interval_sum += now - self.last_end
            self.interval_count += 1
        self.last_end = now

    def state_dict(self) -> dict:
        keys = ("iteration", "count", "time_sum", "first_times", "last_losses", "interval_sum", "interval_count")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def result(self, total_batch: int, world_size: int, device: str, nonfinite_steps: int) -> dict:
        skip = self.warmup if self.count > 2 * self.warmup else min(1, self.count - 1)
        skip = max(skip, 0)
        step_time = (self.time_sum - sum(self.first_times[:skip])) / (self.count - skip) if self.count else math.nan
        tail = [x for x in self.last_losses if math.isfinite(x)]
        iter_time = self.interval_sum / self.interval_count if self.interval_count else None
        return {
            "iter_time_s": round(iter_time, 4) if iter_time is not None else None,
            "fps": round(total_batch / iter_time, 4) if iter_time else None,
            "step_time_s": round(step_time, 4),
            "samples_per_s": round(total_batch / step_time, 4) if step_time > 0 else 0.0,
            "iterations": self.iteration,
            "world_size": world_size,
            "global_batch": total_batch,
            "device": device,
            "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
            "nonfinite_steps": nonfinite_steps,
        }


class TrainLog:
    """The record of one run from iteration `start` to `total`: every rank keeps the summary; the
    main process (rank 0) also writes the DVCLive curves in `live_dir` (continuing them on
    resume), shows the progress bar and writes `text_log` (appended to on resume, started afresh
    otherwise), one line every `log_interval` iterations."""

    def __init__(
        self,
        live_dir: str,
        main: bool,
        start: int,
        total: int,
        summary: dict | None = None,
        text_log: str | None = None,
        log_interval: int = 50,
    ):
        self.summary = RunningSummary()
        if summary is not None:
            self.summary.load_state_dict(summary)
        self.live = None
        self.text = None
        self.total, self.log_interval, self.started = total, log_interval, time.monotonic()
        if main:
            from dvclive import Live

            self.live = Live(dir=live_dir, resume=start > 0, save_dvc_exp=False, dvcyaml=False)
            if start > 0:
                self.live.step = start
            if text_log is not None:
                Path(text_log).parent.mkdir(parents=True, exist_ok=True)
                self.text = open(text_log, "a" if start > 0 else "w", buffering=1)
        self.bar = tqdm(total=total, initial=start, desc="train", unit="it", disable=not main)

    def note(self, line: str, echo: bool = True) -> None:
        """A line for the log file (rank 0), printed too unless `echo` is False."""
        if self.text is not None:
            self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        if echo and self.live is not None:
            self.bar.write(line)

    def step(
        self, iteration: int, losses: dict[str, torch.Tensor], loss: float, lr: float, grad_norm: float, seconds: float
    ) -> None:
        """After iteration `iteration` (counted from 1): its losses at DVCLive step iteration - 1."""
        self.summary.add(iteration, loss, seconds)
        if self.live is not None:
            for key, value in losses.items():
                self.live.log_metric(f"train/{key}", float(value.detach()))
            self.live.log_metric("train/loss", loss)
            self.live.log_metric("train/lr", lr)
            self.live.log_metric("train/grad_norm", grad_norm)
            self.live.log_metric("train/step_time_s", seconds)
            self.live.next_step()
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        self.bar.update()
        if iteration % self.log_interval == 0 or iteration == self.total:
            elapsed = int(time.monotonic() - self.started)
            self.note(
                f"train: iteration {iteration}/{self.total}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
                f"step {seconds:.3f} s  elapsed {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}",
                echo=False,
            )

    def end_iteration(self) -> None:
        """The iteration's work is done (step, logging, validation): the seed's step time runs
        from here to here."""
        self.summary.end_iteration(time.perf_counter())

    def validation(self, iteration: int, metrics: dict[str, Any] | None, seconds: float) -> None:
        """Validation after `iteration` (None on the ranks other than 0): at DVCLive step
        `iteration`, beside the losses of the next forward, which sees the same weights."""
        if metrics is None or self.live is None:
            return
        self.note(
            f"train: validation after iteration {iteration}: mAP {metrics['mAP']:.4f}, NDS {metrics['NDS']:.4f} "
            f"({seconds:.1f} s)"
        )
        for key in VAL_METRICS:
            self.live.log_metric(f"val/{key}", float(metrics[key]))

    def close(self) -> None:
        self.bar.close()
        if self.live is not None:
            self.live.end()
        if self.text is not None:
            self.text.close()
