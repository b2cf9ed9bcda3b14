"""A diffusers-shaped pipeline around the toy model, for exact tests of step / branch /
generation handling without diffusers: a scheduler with `timesteps` and (optionally)
`step_index`, and a loop that calls the transformer once or twice per step."""

from __future__ import annotations

import contextlib

import torch
import toy


class CountingScheduler:
    """Like DDIM: set_timesteps builds a new tensor; no step_index at all."""

    def __init__(self) -> None:
        self.timesteps = torch.zeros(0)

    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.arange(n, 0, -1)

    def step(self) -> None:
        pass


class Scheduler(CountingScheduler):
    """Like Euler / DPM-Solver: step_index is None until the first step(), then counts."""

    def __init__(self) -> None:
        super().__init__()
        self._step_index: int | None = None
        self.begin_index = None

    def set_timesteps(self, n: int) -> None:
        super().set_timesteps(n)
        self._step_index = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def step(self) -> None:
        self._step_index = 1 if self._step_index is None else self._step_index + 1


class Pipe:
    """boundary: Wan 2.2's two experts, `transformer` for the steps before it and
    `transformer_2` from it on."""

    def __init__(self, scheduler: Scheduler | None = None, boundary: int | None = None) -> None:
        self.transformer = toy.Toy()
        self.scheduler = scheduler or Scheduler()
        self.boundary = boundary
        if boundary is not None:
            self.transformer_2 = toy.Toy()

    @property
    def components(self) -> dict:
        experts = {"transformer_2": self.transformer_2} if self.boundary is not None else {}
        return {"transformer": self.transformer, **experts, "scheduler": self.scheduler}

    def __call__(self, ts: list[float], second: list[float] | None = None,
                 contexts: tuple[str, str] | None = None, fail_at: int | None = None
                 ) -> list[tuple[float, ...]]:
        """One generation: transformer(t) per step, plus transformer(second[k]) if given."""
        self.scheduler.set_timesteps(len(ts))
        out = []
        for k, t in enumerate(ts):
            if k == fail_at:
                raise RuntimeError("interrupted")
            model = self.transformer
            if self.boundary is not None and k >= self.boundary:
                model = self.transformer_2
            ctx = model.cache_context if contexts else None
            with ctx(contexts[0]) if ctx else contextlib.nullcontext():
                a = model(*toy.inputs(t)).item()
            if second is not None:
                with ctx(contexts[1]) if ctx else contextlib.nullcontext():
                    b = model(*toy.inputs(second[k])).item()
                out.append((a, b))
            else:
                out.append((a,))
            self.scheduler.step()
        return out
