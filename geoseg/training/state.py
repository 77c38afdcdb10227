"""What a run keeps between epochs: the resume state folder, the log, the averaged weights
(``--ema``), and the chip prefetching thread."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import InputError
from geoseg.training.config import TrainConfig, resume_dir_for


class RunState:
    """The resume state folder: files named per epoch, ``state.json`` replaced last and atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def read(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"resume state {self.folder} is unreadable ({exc}); start again without --resume (with --overwrite)") from None

    def write(self, model, state: dict[str, Any], *, best_improved: bool, averaged: "Averaged | None" = None) -> None:
        """Save this epoch's weights and optimizer variables (and the averaged weights with
        ``--ema``, which are then the ones kept as the best), then point ``state.json`` at them."""
        self.folder.mkdir(exist_ok=True)
        epoch = state["epoch"]
        previous = self.read()["files"] if self.exists() else {}
        files = {"weights": f"epoch-{epoch:04d}.weights.h5", "optimizer": f"epoch-{epoch:04d}.optimizer.npz",
                 "best": previous.get("best")}
        model.save_weights(self.folder / files["weights"])
        with open(self.folder / files["optimizer"], "wb") as f:
            np.savez(f, *[np.asarray(v) for v in model.optimizer.variables])
        if averaged is not None and averaged.values is not None:
            files["ema"] = f"epoch-{epoch:04d}.ema.npz"
            with open(self.folder / files["ema"], "wb") as f:
                np.savez(f, *averaged.values)
        if best_improved or files["best"] is None:
            files["best"] = f"best-{epoch:04d}.weights.h5"
            if averaged is not None and averaged.values is not None:
                with averaged.applied(model):
                    model.save_weights(self.folder / files["best"])
            else:
                shutil.copyfile(self.folder / files["weights"], self.folder / files["best"])
        tmp = self.folder / f"state.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({**state, "files": files}, indent=1))
        os.replace(tmp, self.folder / "state.json")
        keep = set(files.values()) | {"state.json"}
        for p in self.folder.iterdir():
            if p.name not in keep:
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)





class Averaged:
    """Exponential moving average of a model's trainable weights (``--ema``), kept in numpy.

    ``update`` after each training step; ``with averaged.applied(model):`` swaps the average in
    (to validate or save it) and the raw weights back afterwards. The first update copies the
    weights, so a fine-tuning run averages from its starting point."""

    def __init__(self, momentum: float, values: list[np.ndarray] | None = None) -> None:
        self.momentum = momentum
        self.values = values

    def update(self, model) -> None:
        weights = [np.asarray(v.numpy()) for v in model.trainable_variables]
        if self.values is None:
            self.values = [w.astype(np.float32, copy=True) for w in weights]
            return
        m = self.momentum
        for avg, w in zip(self.values, weights):
            avg *= m
            avg += (1 - m) * w

    @contextlib.contextmanager
    def applied(self, model):
        if self.values is None:
            yield
            return
        raw = [np.array(v.numpy()) for v in model.trainable_variables]
        for var, avg in zip(model.trainable_variables, self.values):
            var.assign(avg)
        try:
            yield
        finally:
            for var, w in zip(model.trainable_variables, raw):
                var.assign(w)


def prefetched(batches, depth: int = 2):
    """Yield the items of the iterator ``batches``, drawn ahead by a background thread (``depth``
    at most), so that sampling and augmenting the next batch (numpy, which releases the GIL in
    its heavy loops) overlaps the model's step. The order is unchanged; an error in the thread
    is raised here, and leaving the loop early stops the thread."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in batches:
                if not put(("item", item)):
                    return
            put(("end", done))
        except BaseException as exc:  # handed to the consumer
            put(("error", exc))

    thread = threading.Thread(target=fill, name="geoseg-chips", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


def resumed_config(output: str | os.PathLike) -> TrainConfig:
    """The settings of the interrupted run whose state lies beside ``output``."""
    state = RunState(resume_dir_for(output))
    if not state.exists():
        raise InputError(f"--resume: no saved state at {state.folder}; start the run without --resume")
    return TrainConfig.from_dict(state.read()["config"])
