"""The one error path: every mistake a user can make surfaces as a `PeripheryError`.

Each error carries a one-line `message` for humans (what is wrong and what to do) and a short
`title` for UIs. The CLI prints the message and exits 2; the app shows it in a modal. Nothing
parses these strings.
"""

from __future__ import annotations


class PeripheryError(Exception):
    """Base class for errors caused by input a user can fix."""

    title = "Error"

    def __init__(self, message: str, title: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if title is not None:
            self.title = title

    def __str__(self) -> str:
        return self.message


class ModelLoadError(PeripheryError):
    """The model file is missing, unreadable, truncated or not ONNX."""

    title = "Cannot load model"


class InputShapeError(PeripheryError):
    """A user-given input shape does not fit the model."""

    title = "Bad input shape"


class AnalysisError(PeripheryError):
    """The model could not be typed or costed."""

    title = "Analysis failed"


class PlanError(PeripheryError):
    """A plan cannot be made, read or applied."""

    title = "Cannot plan"


class DevicesError(PeripheryError):
    """A devices file is malformed."""

    title = "Bad devices file"


class ExtractError(PeripheryError):
    """A shard could not be extracted."""

    title = "Cannot extract shard"


class RuntimeFailure(PeripheryError):
    """ONNX Runtime refused a model or failed while running it."""

    title = "Runtime error"


class FeedError(PeripheryError):
    """User-given input tensors do not fit the model."""

    title = "Bad inputs"


class QuantizeError(PeripheryError):
    """A model cannot be quantized as asked (bad settings, missing extra, failed method)."""

    title = "Cannot quantize"


class DataError(PeripheryError):
    """A data spec, folder or file cannot give feeds that fit the model."""

    title = "Bad data"


class EvaluationError(PeripheryError):
    """Two models cannot be compared on the data given."""

    title = "Cannot evaluate"


class DiscoveryError(PeripheryError):
    """A peer address or advertisement setting given by the user is unusable."""

    title = "Discovery"


class ClusterError(PeripheryError):
    """A node cannot be reached, refuses a shard, or the pipeline cannot run."""

    title = "Cluster"


class RequestFailed(PeripheryError):
    """One request did not complete (a stage failed on it, or its node was lost)."""

    title = "Request failed"


class ClusterBusy(PeripheryError):
    """More requests are in flight than the master accepts."""

    title = "Busy"


class KeysError(PeripheryError):
    """Cluster keys are missing, malformed, or untrusted."""

    title = "Keys"


class Cancelled(PeripheryError):
    """A long operation was cancelled by the user."""

    title = "Cancelled"
