"""The run skeleton both trainers stand on: folder, resume, checkpoints, stops, seeds, logging, epochs.

``sparse_mim.train.pretrain`` (SparK pre-training) and ``fgvc.train.train`` (MetaFormer fine-tuning)
supply the task (data, model, optimizer, one epoch, evaluation); a :class:`TrainingRun` does the rest,
the same way for both::

    with TrainingRun(cfg, kind="fgvc", job_type="fgvc-train", format="fgvc.train", guard=guard) as run:
        ck = run.load_resume()                     # None, or a full training checkpoint of this kind
        ...                                        # data, model, optimizer, schedule
        run.attach(model, optimizer, scaler, total_steps=..., steps_per_epoch=..., accum_steps=...,
                   global_batch=..., info={...}, extra_state=..., where=...)
        finished = run.restore(ck, schedule="...")  # the stored summary when the run already ended
        run.open_logger(amp=amp)
        stopped = run.train(run_epoch, end_epoch)  # epochs from the resumed position; True when stopped
        return run.summary(...) if stopped else run.finish(summary)

What the skeleton owns, once:

* **the run folder** (:meth:`__enter__`): rank 0 checks it (``prepare_run_dir``: never overwrite a run,
  one run per folder), removes temporary files left by a killed writer and saves ``config.yaml``; a
  refusal on rank 0 stops every rank (the others would wait for it forever);
* **resume** (:meth:`load_resume`, :meth:`restore`): ``resume=auto`` with no checkpoint yet starts a new
  run and says so; checkpoints that exist but none loads -> ``CheckpointError`` naming them, nothing
  touched; a checkpoint of another kind (``require_checkpoint_kind``) or a weights-only file
  (``best.pth``) -> ``CheckpointError`` saying which file continues the run; a checkpoint past the end
  of this schedule -> ``ConfigError`` saying what to change; a run that already reached its end and
  wrote ``final.json`` -> nothing to do, the stored summary comes back (``already_finished``);
* **checkpoints** (:meth:`save`): every rank agrees that the state is finite before rank 0 writes
  (else ``NonFiniteStateError`` naming the last good checkpoint), atomic writes; ``last.pth`` every
  ``checkpoint.every_steps`` and at every epoch end, ``checkpoint-<step>.pth`` every
  ``checkpoint.keep_every_steps``, ``best.pth`` (weights only) when the trainer says so. The same keys
  in both trainers: ``model``, ``optimizer``, ``scaler`` (fp16), ``train_state``, ``config``,
  ``wandb_run_id`` (older fgvc files stored ``wandb_id``: read too), ``format``, ``format_version``,
  ``world_size``, ``global_batch``, ``steps_per_epoch``, ``total_steps``, plus the trainer's own;
* **stops** (:meth:`should_stop`): a collective check after every optimizer step (a pre-emption signal
  on any rank, Ctrl-C, or ``train.stop_at_step``); on a stop rank 0 writes ``last.pth``, every rank
  waits for it, one ``[stop]`` line says where the run is, and the summary says ``stopped`` /
  ``stopped_early``, ``preempted`` (a signal) and ``stop_signal`` (its name: the CLIs exit with 75 for
  a requeue, 130 after Ctrl-C);
* **seeds**: ``init_seed`` (the same initial weights on every rank and run); every other stream is
  ``stream_seed(seed, tag, *position)`` (:mod:`sparse_mim.utils.streams`);
* **logging**: one :class:`~sparse_mim.utils.logger.RunLogger` (rank 0 writes), and the per-step hooks
  (:attr:`step_hooks`, the trainer's pictures / monitors; the periodic checkpoints run after them).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from . import distributed as dist_utils
from .config import Config, ConfigError
from .misc import NonFiniteLossError
from .streams import stream_seed

__all__ = ["TrainState", "TrainingRun", "FINAL_NAME"]

FINAL_NAME = "final.json"   # the summary of a finished run (both trainers)


@dataclass
class TrainState:
    """Where a run is: what a checkpoint restores besides the modules (both trainers).

    ``batch`` counts the micro-batches done in ``epoch`` (a multiple of the accumulation steps:
    checkpoints are taken at optimizer-step boundaries); ``best`` is the model selection's best
    evaluation so far (fine-tuning).
    """
    step: int = 0                 # optimizer steps done
    epoch: int = 0
    batch: int = 0                # micro-batches done in the current epoch
    images_seen: int = 0
    failed_images: int = 0        # unreadable images skipped so far (all ranks)
    skipped_steps: int = 0        # optimizer steps skipped for non-finite gradients
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    history: list = field(default_factory=list)  # (step, loss) at log points, for the final summary
    best: dict = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})

    def state_dict(self) -> dict:
        return dict(step=self.step, epoch=self.epoch, batch=self.batch, images_seen=self.images_seen,
                    failed_images=self.failed_images, skipped_steps=self.skipped_steps, first_loss=self.first_loss,
                    last_loss=self.last_loss, history=[list(h) for h in self.history], best=dict(self.best))

    def load_state_dict(self, d: Mapping) -> None:
        """Any earlier layout: pre-training's (no ``batch`` / ``best``) and fine-tuning's (epoch, step, batch,
        best only); missing fields keep their defaults."""
        for k, v in d.items():
            if k == "history":
                self.history = [tuple(h) for h in v]
            elif k == "best":
                self.best = dict(v)
            elif k in ("step", "epoch", "batch", "images_seen", "failed_images", "skipped_steps"):
                setattr(self, k, int(v))
            elif k in ("first_loss", "last_loss"):
                setattr(self, k, v)


class TrainingRun:
    """One training run's skeleton (module docstring). Use as a context manager: entering sets up the
    process group, the pre-emption guard and the run folder; leaving releases them on every path.

    ``kind``: the checkpoint kind a resume accepts (``checkpoint_kind``: ``spark-pretrain`` / ``fgvc``);
    ``format``: the ``format`` tag written into checkpoints; ``weights_option``: the option that starts
    a new run from a weights-only file (named when one is given as ``resume``); ``guard``: a
    ``PreemptionGuard`` to use (the CLIs install one; tests call ``guard.request()``), else one is made.
    """

    def __init__(self, cfg: Config, *, kind: str, job_type: str, format: str, weights_option: str,
                 guard=None, log: Callable[..., None] = print):
        self.cfg, self.kind, self.job_type, self.format = cfg, kind, job_type, format
        self.weights_option = weights_option
        self.guard, self._own_guard = guard, guard is None
        self.log = log
        self.out_dir = cfg.output_dir
        self.last_path = os.path.join(self.out_dir, "last.pth")
        self.best_path = os.path.join(self.out_dir, "best.pth")  # the model selection's weights (fine-tuning)
        self.state = TrainState()
        self.step_hooks: list[Callable[[TrainState], None]] = []
        self.logger = None
        self.run_dir = None
        self.resume_path: Optional[str] = None
        self.wandb_run_id: Optional[str] = None
        self.stopped = False
        self._saved: Optional[tuple[int, str]] = None  # (step, path) of this run's newest good checkpoint
        self.stop_at = int(cfg.train.stop_at_step)

    # ------------------------------------------------------------------ set-up / tear-down
    def __enter__(self) -> "TrainingRun":
        from .preemption import PreemptionGuard
        if self._own_guard:
            self.guard = PreemptionGuard().__enter__()
        try:
            if self.cfg.train.cpu_threads > 0:
                torch.set_num_threads(self.cfg.train.cpu_threads)
            self.dist = dist_utils.init_distributed(self.cfg.device, timeout_s=self.cfg.train.dist_timeout)
            self.device, self.is_main = self.dist.device, self.dist.is_main
            self.rank, self.world_size = self.dist.rank, self.dist.world_size
            self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
            self.say = self.log if self.is_main else (lambda *a, **k: None)
            self._open_run_dir()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.logger is not None:
                self.logger.finish()
            if self.run_dir is not None:
                self.run_dir.release()
            dist_utils.cleanup()
        finally:
            if self._own_guard and self.guard is not None:
                self.guard.__exit__(None, None, None)

    def _open_run_dir(self) -> None:
        from .checkpoint import remove_orphan_temps
        from .rundir import prepare_run_dir
        error = None
        if self.is_main:
            try:
                self.run_dir = prepare_run_dir(self.out_dir, self.cfg.resume, log=self.say)  # never overwrite a run
                orphans = remove_orphan_temps(self.out_dir)
                if orphans:
                    self.say(f"[run] removed {len(orphans)} temporary file(s) left by an interrupted write in "
                             f"{self.out_dir}")
                self.save_config()
            except Exception as e:  # noqa: BLE001 - re-raised below on this rank, after telling the others
                error = e
        if dist_utils.any_rank(error is not None, self.comm_device):
            if error is not None:
                raise error
            raise RuntimeError("the main process refused the output folder (see its message)")

    def save_config(self) -> None:
        """``config.yaml`` of the run (rank 0); trainers call it again when they resolve a setting."""
        from .config import save_config
        if self.is_main:
            save_config(self.cfg, self.out_dir)

    @property
    def init_seed(self) -> int:
        """Seed of the initial weights: the same on every rank and in every run of this seed."""
        return stream_seed(self.cfg.seed, "init")

    # ------------------------------------------------------------------ resume
    def load_resume(self) -> Optional[dict]:
        """The checkpoint ``resume`` names (``auto``: the newest loadable one in the folder), checked to be
        a full training checkpoint of this trainer; None for a new run."""
        from .checkpoint import CheckpointError, load_checkpoint, require_checkpoint_kind, resume_auto
        path, ck = None, None
        if self.cfg.resume == "auto":
            path, ck = resume_auto(self.out_dir, log=self.say)  # raises when checkpoints exist but none loads
            if path is None:
                self.say(f"[resume] resume=auto: no checkpoint in {self.out_dir} yet, starting a new run")
        elif self.cfg.resume:
            path, ck = self.cfg.resume, load_checkpoint(self.cfg.resume, check_finite=True)
        if ck is None:
            return None
        require_checkpoint_kind(ck, path, [self.kind], "resume")  # names a file of the other half as such
        if not isinstance(ck, dict) or not all(k in ck for k in ("model", "optimizer", "train_state")):
            raise CheckpointError(
                f"resume: {path} holds the weights only (no optimizer / training state; best.pth is such a file); "
                f"resume from the run's last.pth, or start a new run from these weights with "
                f"{self.weights_option}=PATH")
        self.resume_path = path
        return ck

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler=None, *, total_steps: int,
               steps_per_epoch: int, accum_steps: int, global_batch: int, info: Optional[Mapping] = None,
               extra_state: Optional[Callable[[], Mapping]] = None,
               where: Optional[Callable[[TrainState], str]] = None) -> None:
        """What the checkpoints hold and the schedule's length. ``info``: the trainer's fixed checkpoint keys
        (written into every checkpoint, ``best.pth`` too); ``extra_state()``: its changing ones (``last.pth``
        and keeps only, e.g. the EMA weights); ``where(state)``: a position as the resume / stop lines say it."""
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.where = where or (lambda s: f"epoch {s.epoch}, {s.step - s.epoch * self.steps_per_epoch} of its "
                                         f"{self.steps_per_epoch} steps done")
        self.total_steps, self.steps_per_epoch = int(total_steps), int(steps_per_epoch)
        self.accum_steps, self.global_batch = int(accum_steps), int(global_batch)
        self.info, self.extra_state = dict(info or {}), extra_state

    def restore(self, ck: Optional[Mapping], schedule: str) -> Optional[dict]:
        """Load ``ck`` (from :meth:`load_resume`) into the attached modules and the state. Returns the stored
        summary (``already_finished``) when the run had reached its end; ``schedule`` says which settings set
        this schedule's length (for the refusal of a checkpoint past its end)."""
        from .amp import load_scaler_state
        from .logger import new_run_id
        if ck is None:
            self.wandb_run_id = new_run_id()  # known before the logger starts (fgvc names its wandb group by it)
            return None
        state = self.state
        state.load_state_dict(ck["train_state"])
        if state.step > self.total_steps:
            raise ConfigError(
                f"resume: {self.resume_path} is at step {state.step}, past the end of this schedule "
                f"({self.total_steps} steps: {schedule}), beyond where this run can continue; resume with the "
                f"run's own settings (or a longer schedule), or start a new run in another output_dir")
        final_path = os.path.join(self.out_dir, FINAL_NAME)
        if state.step == self.total_steps and os.path.isfile(final_path):
            self.say(f"[resume] {self.out_dir} holds a finished run (step {state.step}/{self.total_steps}, "
                     f"{FINAL_NAME}): nothing to do; start a new run with another output_dir")
            with open(final_path) as f:
                return dict(json.load(f), already_finished=True)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        load_scaler_state(self.scaler, ck.get("scaler"))
        # wandb_id: older fgvc files; a checkpoint with neither starts a new wandb run, named before the logger starts
        self.wandb_run_id = ck.get("wandb_run_id") or ck.get("wandb_id") or new_run_id()
        if ck.get("global_batch") not in (None, self.global_batch):
            self.say(f"[resume] warning: resuming with global batch {self.global_batch}, the checkpoint used "
                     f"{ck['global_batch']}: the data order after the resume point differs from the original run")
        self.say(f"[resume] resumed from {self.resume_path}: step {self.state.step}/{self.total_steps}, "
                 f"{self.where(self.state)}")
        return None

    # ------------------------------------------------------------------ logging
    def open_logger(self, amp=None, perf=None, **extra):
        """The run's one logger (rank 0 writes; a resumed run continues its wandb run)."""
        from .logger import RunLogger, new_run_id
        cfg = self.cfg
        self.wandb_run_id = self.wandb_run_id or new_run_id()
        self.logger = RunLogger(self.out_dir, cfg, project=cfg.wandb.project, name=cfg.wandb.name or None,
                                entity=cfg.wandb.entity or None, run_id=self.wandb_run_id, enabled=self.is_main,
                                job_type=self.job_type, use_wandb=cfg.wandb.enabled, **extra)
        if amp is not None:
            self.logger.log_config({"amp_resolved": amp.as_dict()})  # what train.amp picked on this hardware
        if perf is not None:
            self.logger.log_config({"perf": perf.as_dict()})
        return self.logger

    # ------------------------------------------------------------------ checkpoints
    def save(self, which: str = "last", weights: Optional[Mapping] = None) -> Optional[str]:
        """Write ``last.pth`` / ``checkpoint-<step>.pth`` (``which="keep"``) / ``best.pth`` (weights only:
        ``weights`` or the model's) on rank 0 after every rank agreed that the state is finite. Collective."""
        from .checkpoint import (FORMAT_VERSION, NonFiniteStateError, checkpoint_name, non_finite_tensors,
                                 save_checkpoint, unwrap_model)
        full = which != "best"
        tensors = {"model": dict(weights) if weights is not None else unwrap_model(self.model).state_dict()}
        if full:
            tensors["optimizer"] = self.optimizer.state_dict()
            if self.scaler is not None:
                tensors["scaler"] = self.scaler.state_dict()
            tensors.update(self.extra_state() if self.extra_state else {})
        bad = non_finite_tensors(tensors) if self.is_main else []
        n_bad = int(dist_utils.all_reduce_sum(torch.tensor([float(len(bad))], device=self.comm_device))[0])
        if n_bad:
            raise NonFiniteStateError(
                f"step {self.state.step}: the training state became non-finite ({n_bad} tensor(s), e.g. "
                f"{', '.join(bad[:3]) or 'on rank 0'}); nothing was written, {self.last_good()}. Usual fixes: lower "
                "optim.lr, keep optim.clip_grad on, or train.amp=off; then resume=auto")
        path = {"last": self.last_path, "best": self.best_path,
                "keep": os.path.join(self.out_dir, checkpoint_name(self.state.step))}[which]
        if self.is_main:
            ck = {**tensors, "train_state": self.state.state_dict(), "config": self.cfg.to_dict(),
                  "wandb_run_id": self.wandb_run_id, "format": self.format, "format_version": FORMAT_VERSION,
                  "world_size": self.world_size, "global_batch": self.global_batch,
                  "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, **self.info}
            save_checkpoint(ck, path, check_finite=False)  # checked above, on the same tensors
        if full:  # on every rank: the stop below decides alike everywhere whether last.pth is current
            self._saved = (self.state.step, path)
        return path if self.is_main else None

    def last_good_path(self) -> Optional[str]:
        """This run's newest checkpoint (``last.pth`` or a keep), else ``last.pth`` if there is one."""
        if self._saved:
            return self._saved[1]
        return self.last_path if os.path.isfile(self.last_path) else None

    def last_good(self) -> str:
        """Where the last good checkpoint is, as the error messages say it."""
        if self._saved:
            return f"the last good checkpoint is {self._saved[1]} (step {self._saved[0]})"
        if os.path.isfile(self.last_path):
            return f"the last good checkpoint is {self.last_path}"
        return "no good checkpoint was written in this run"

    def on_step(self, state: TrainState) -> None:
        """After every optimizer step: the trainer's hooks, then the periodic checkpoints."""
        for hook in self.step_hooks:
            hook(state)
        keep, every = self.cfg.checkpoint.keep_every_steps, self.cfg.checkpoint.every_steps
        if keep > 0 and state.step % keep == 0:
            self.save("keep")
        if every > 0 and state.step % every == 0:
            self.save("last")

    # ------------------------------------------------------------------ stops and the epoch loop
    def should_stop(self, state: TrainState) -> bool:
        """Collective (every rank asks after the same step): a signal on any rank, or ``train.stop_at_step``."""
        signalled = self.guard.should_stop(self.comm_device)
        return signalled or bool(self.stop_at and state.step >= self.stop_at)

    def train(self, run_epoch: Callable[[int, int, int], Mapping],
              end_epoch: Optional[Callable[[int, Mapping], None]] = None) -> bool:
        """Epochs from the resumed position to ``total_steps``; True when a stop ended the run early.

        ``run_epoch(epoch, start_step, steps)`` trains ``steps`` optimizer steps of ``epoch`` from its step
        ``start_step`` (the trainer's loop, which calls :meth:`on_step` and asks :meth:`should_stop` after
        every step but the epoch's last) and returns its stats (``stopped``); ``end_epoch(epoch, stats)``
        runs after a completed epoch (evaluation, ``last.pth``, the epoch's line); then the stop is asked.
        """
        st, spe, total = self.state, self.steps_per_epoch, self.total_steps
        try:
            while st.step < total:
                epoch = st.step // spe
                start = st.step - epoch * spe
                st.epoch, st.batch = epoch, start * self.accum_steps
                stats = run_epoch(epoch, start, min(spe, total - epoch * spe) - start)
                if not stats.get("stopped"):
                    if st.step - epoch * spe >= spe:
                        st.epoch, st.batch = epoch + 1, 0
                    if (st.step - epoch * spe >= spe or st.step >= total) and end_epoch is not None:
                        end_epoch(epoch, stats)
                    if st.step >= total or not self.should_stop(st):
                        continue
                self._stop()
                return True
        except NonFiniteLossError as e:
            from .checkpoint import NonFiniteStateError
            if not isinstance(e, NonFiniteStateError):  # a non-finite loss: say what is left to resume from
                e.args = (f"{e.args[0]} ({self.last_good()})",) + e.args[1:]
            raise
        return False

    def _stop(self) -> None:
        self.stopped = True
        if self._saved != (self.state.step, self.last_path):
            self.save("last")
        dist_utils.barrier()  # nobody exits (and gets the job step killed) before rank 0 has written
        why = self.guard.signal_name if self.guard.requested else f"train.stop_at_step={self.stop_at}"
        self.say(f"[stop] {why}: stopped after step {self.state.step} ({self.where(self.state)}); wrote "
                 f"{self.last_path}; continue with resume=auto")

    # ------------------------------------------------------------------ summaries
    def summary(self, **task: Any) -> dict:
        """The keys every summary has (position, wandb run, how the run ended), then the trainer's."""
        preempted = self.stopped and bool(self.guard.requested)
        st = self.state
        return {"output_dir": self.out_dir, "step": st.step, "epoch": st.epoch, "batch": st.batch,
                "total_steps": self.total_steps, "wandb_run_id": self.wandb_run_id, "stopped": self.stopped,
                "stopped_early": self.stopped, "preempted": preempted,
                "stop_signal": self.guard.signal_name if preempted else None, **task}

    def finish(self, summary: dict) -> dict:
        """A run that reached its end: ``final.json`` (rank 0; what ``resume=auto`` returns from now on)."""
        if self.is_main:
            from .checkpoint import atomic_write_text
            atomic_write_text(os.path.join(self.out_dir, FINAL_NAME), json.dumps(summary, indent=2, default=str))
        return summary
