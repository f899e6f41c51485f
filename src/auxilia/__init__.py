"""auxilia: auxiliary learning for PyTorch."""

from . import gradients, methods
from .tasks import NonFiniteLossError, Task, TaskError, TaskSet

__version__ = "0.1.0"
__all__ = ["NonFiniteLossError", "Task", "TaskError", "TaskSet", "__version__", "gradients", "methods"]
