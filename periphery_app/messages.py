"""Messages the app's screens and workers post upward: past-tense facts, no commands.

Workers run in threads and only ever post these (posting is thread-safe); the App handles the
ones that change shared state (the model, the plan) and pushes that state back down through
its reactive attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from textual.message import Message

from periphery_app.control import OpenedModel
from periphery_core.errors import PeripheryError
from periphery_core.partition.plan import ShardPlan
from periphery_core.progress import Progress

if TYPE_CHECKING:  # annotations only: posting these needs no quantizer loaded here
    from periphery_core.quantize.evaluate import EvalReport
    from periphery_core.quantize.methods import QuantResult


class ModelOpened(Message):
    """A model was loaded and analysed."""

    def __init__(self, opened: OpenedModel) -> None:
        super().__init__()
        self.opened = opened


class PlanChanged(Message):
    """A plan was made, edited or loaded."""

    def __init__(self, plan: ShardPlan) -> None:
        super().__init__()
        self.plan = plan


class OperationFailed(Message):
    """A long operation failed with an error meant for the user."""

    def __init__(self, error: PeripheryError) -> None:
        super().__init__()
        self.error = error


class ProgressReported(Message):
    """A long operation made progress; a newer report replaces an unprocessed older one."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ProgressReported) and (
            message.progress.task == self.progress.task
        )


class NodesConnected(Message):
    """Nodes answered and joined the cluster."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names


class Deployed(Message):
    """A plan's shards were deployed and every stage is ready."""

    def __init__(self, assignment: tuple[str, ...]) -> None:
        super().__init__()
        self.assignment = assignment


class LoadStopped(Message):
    """The request load stopped (asked to, or because the pipeline failed)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__()
        self.reason = reason


class QuantizationFinished(Message):
    """A quantization run quantized the model and evaluated it against fp32."""

    def __init__(self, run: int, result: QuantResult, report: EvalReport) -> None:
        super().__init__()
        self.run = run
        self.result = result
        self.report = report


class QuantizationStopped(Message):
    """A quantization run ended without a result: cancelled, or failed (the error goes up
    separately)."""

    def __init__(self, run: int, cancelled: bool, bad_data: bool = False) -> None:
        super().__init__()
        self.run = run
        self.cancelled = cancelled
        self.bad_data = bad_data


class QuantizedModelSaved(Message):
    """The quantized model was written to a file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
