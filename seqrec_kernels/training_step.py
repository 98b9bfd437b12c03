"""The training step: forward, loss, backward and the Adam update of one batch, one function
of device tensors (docs/training-step.md), run eagerly (op by op) or

- compiled: traced whole by torch.compile(fullgraph=True) — forward, loss, backward and the
  optimizer update in one graph, compiled once per input shape (token bucket);
- captured (CUDA): recorded once per input shape as a torch.cuda.CUDAGraph over static input
  buffers, then replayed: one launch per step, no Python per op (compiled or not).

The update is torch's own Adam/AdamW math (torch.optim.adam.adam) on the state of a
torch.optim.Adam/AdamW, so checkpoints hold an ordinary optimizer state_dict. It is
capturable where the step is compiled or captured: the step counts live on the device and
the learning rate is a constant, so nothing in the step reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.optim.adam import adam

Inputs = Sequence[torch.Tensor]  # the step's tensors, in the order the loss function takes them


def make_optimizer(parameters, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """Adam (AdamW when weight_decay > 0: decoupled), betas (0.9, 0.98) as the SASRec code;
    fused and capturable on CUDA (step counts on the device), foreach on a CPU: torch's fused
    CPU Adam is 1.5-3x faster at Games' sizes, but the quality comparison of this trainer with
    the previous one (docs/sasrec.md: unchanged within noise) was made with foreach."""
    cuda = device.type == "cuda"
    kind = torch.optim.AdamW if weight_decay > 0 else torch.optim.Adam
    options = dict(fused=True, capturable=True) if cuda else dict(foreach=True)
    return kind(parameters, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay, **options)


def whole_step_compilable() -> bool:
    """Whether this torch's Dynamo traces Tensor.backward() into the graph (config flag
    trace_autograd_ops): then torch.compile takes the whole step with fullgraph=True."""
    return hasattr(torch._dynamo.config, "trace_autograd_ops")


class TrainingStep:
    """step(inputs) -> the loss (detached, on the device, not read): zero the gradients,
    loss_fn(inputs) under autocast to `amp_dtype` (None: off), backward, Adam update of
    `optimizer`'s parameters; compiled whole (`compile`: True, or a torch.compile backend)
    and/or replayed from CUDA graphs (`graph`). `scaler`: fp16's GradScaler, eager steps
    only (it reads its inf check on the host and steps through optimizer.step())."""

    def __init__(
        self,
        loss_fn: Callable[[Inputs], torch.Tensor],
        optimizer: torch.optim.Adam,
        amp_dtype: torch.dtype | None = None,
        compile: bool | str | Callable = False,
        graph: bool = False,
        scaler: torch.amp.GradScaler | None = None,
    ):
        if len(optimizer.param_groups) != 1:
            raise ValueError(f"optimizer: expected one parameter group, got {len(optimizer.param_groups)}")
        self.loss_fn, self.optimizer, self.amp_dtype = loss_fn, optimizer, amp_dtype
        self.compile, self.graph = compile, graph
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.params = list(optimizer.param_groups[0]["params"])
        device = self.device = self.params[0].device
        if graph and device.type != "cuda":
            raise ValueError(f"graph: CUDA graphs need CUDA parameters, got them on {device}")
        if self.scaler is not None and (compile or graph):
            raise ValueError("scaler: fp16's GradScaler reads its inf check on the host: eager steps only")
        # Compiled or captured: step counts on the device (capturable); eager on a CPU, torch's
        # default of host step counts (its capturable path is for accelerators only).
        self.capturable = compile or graph or device.type == "cuda"
        self.fused = bool(optimizer.param_groups[0].get("fused")) and not compile
        self._init_state(device if self.capturable else torch.device("cpu"))
        self._run = self._step
        if compile:
            backend = "inductor" if compile is True else compile
            # dynamic=False: one graph per token bucket, each with static shapes (CUDA graphs too)
            self._run = torch.compile(self._run, backend=backend, fullgraph=whole_step_compilable(), dynamic=False)
        if graph:
            self._run = CapturedSteps(self._run)

    def _init_state(self, step_device: torch.device) -> None:
        """The optimizer state as torch.optim.Adam creates it on its first step (kept from a
        resumed checkpoint), with the step counts on `step_device`: the step reads these lists."""
        state = self.optimizer.state
        for p in self.params:
            if not state[p]:
                state[p].update(
                    step=torch.zeros((), dtype=torch.float32),
                    exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                )
            state[p]["step"] = state[p]["step"].to(step_device, torch.float32)
        self.exp_avgs = [state[p]["exp_avg"] for p in self.params]
        self.exp_avg_sqs = [state[p]["exp_avg_sq"] for p in self.params]
        self.steps = [state[p]["step"] for p in self.params]

    def host_step_counts(self) -> list[torch.Tensor]:
        """The step counts when they live on the host (eager on a CPU): reading them is no sync."""
        return [] if self.capturable else self.steps

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        """inputs: host tensors (pinned, for a copy that does not wait) or device tensors."""
        if not self.graph:  # CapturedSteps copies them into its static buffers itself
            inputs = [t if t.device == self.device else t.to(self.device, non_blocking=True) for t in inputs]
        # Gradients start from None, outside the traced or captured step: Dynamo's backward
        # lowering needs it so at the step's entry (when it retraces for another shape too).
        for p in self.params:
            p.grad = None
        if self.compile and whole_step_compilable():
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                return self._run(inputs)
        return self._run(inputs)

    def _step(self, inputs: Inputs) -> torch.Tensor:
        # No autocast weight-cast cache under CUDA graph capture: a cached cast would be a
        # tensor of one capture, read by another.
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                                  cache_enabled=not self.graph)  # fmt: skip
        with autocast:
            loss = self.loss_fn(inputs)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return loss.detach()
        loss.backward()
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            adam(
                self.params, [p.grad for p in self.params], self.exp_avgs, self.exp_avg_sqs, [], self.steps,
                foreach=None if self.fused else True, fused=self.fused or None, capturable=self.capturable,
                decoupled_weight_decay=group.get("decoupled_weight_decay", False), amsgrad=False, beta1=beta1,
                beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            )  # fmt: skip
        return loss.detach()


class CapturedSteps:
    """step(inputs) replayed from CUDA graphs, one per input shape: the first WARMUP steps of
    a shape run eagerly (on a side stream, as torch's capture recipe: lazy initialization,
    Triton compilation), the next is captured with its inputs as the graph's static buffers,
    and every step of that shape from then on copies its inputs into those buffers and
    replays. The graphs share one memory pool: what persists from one replay to the next
    (inputs, parameters, optimizer state) lives outside it, so the only tensor of a graph
    that another graph's replay may overwrite is its loss output, which is valid until the
    next step (stream-ordered after the uses the caller queued). The gradients live inside
    the graphs: p.grad is None after a replayed step."""

    WARMUP = 2

    def __init__(self, step: Callable[[Inputs], torch.Tensor]):
        self.step = step
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.pool = None  # the graphs' shared memory pool, from the first capture on

    @staticmethod
    def key(inputs: Inputs) -> tuple:
        return tuple((tuple(t.shape), t.dtype) for t in inputs)

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        key = self.key(inputs)
        if key in self.graphs:
            graph, static_inputs, static_loss = self.graphs[key]
            for buffer, value in zip(static_inputs, inputs, strict=True):
                buffer.copy_(value, non_blocking=True)
            graph.replay()
            return static_loss
        device = torch.device("cuda", torch.cuda.current_device())
        # Copies even of device tensors: captured, they become the graph's own static buffers,
        # which later steps overwrite (never the caller's tensors).
        inputs = [t.to(device, non_blocking=True, copy=True) for t in inputs]
        if self.eager_steps.get(key, 0) < self.WARMUP:
            self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self.step(inputs)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the batch thread may pin memory (cudaHostAlloc) while this one captures
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # runs at replay()
                static_loss = self.step(inputs)
        except RuntimeError as error:
            raise RuntimeError(
                f"CUDA graph capture of the training step failed (an op that synchronizes or copies from "
                f"pageable host memory?): {error}; train with --no-cuda-graph to run eager steps"
            ) from error
        self.graphs[key] = (graph, inputs, static_loss)
        graph.replay()
        return static_loss
