"""Shoal: a distributed runtime for AI agents on one Redis-protocol engine.

The public API, grouped by concept. Everything else is internal.
"""

from shoal.agent import Agent, TaskContext, capability, handler, subscribe
from shoal.client import Client, DeadLetter, TaskHandle
from shoal.coordination.saga import Saga, SagaHandle, SagaInfo, SagaStep
from shoal.errors import (
    ConfigurationError,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    LockLost,
    LockTimeout,
    NotHosted,
    QueueFull,
    RateLimited,
    RequestFailed,
    RequestTimeout,
    ResultTimeout,
    Retry,
    SagaFailed,
    SagaNotFound,
    SerializationError,
    ShoalError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    TaskTimeout,
    UnknownAgentType,
)
from shoal.protocol import AgentInfo, AgentTypeInfo, ErrorInfo, Event, TaskInfo
from shoal.settings import Settings
from shoal.sync import SyncClient, connect

__version__ = "0.1.0"

__all__ = [
    # agents
    "Agent",
    "TaskContext",
    "capability",
    "handler",
    "subscribe",
    # clients
    "Client",
    "DeadLetter",
    "SyncClient",
    "TaskHandle",
    "connect",
    # sagas
    "Saga",
    "SagaHandle",
    "SagaInfo",
    "SagaStep",
    # data
    "AgentInfo",
    "AgentTypeInfo",
    "ErrorInfo",
    "Event",
    "Settings",
    "TaskInfo",
    # errors
    "ConfigurationError",
    "DeadlineExceeded",
    "EngineError",
    "EngineUnavailable",
    "LockLost",
    "LockTimeout",
    "NotHosted",
    "QueueFull",
    "RateLimited",
    "RequestFailed",
    "RequestTimeout",
    "ResultTimeout",
    "Retry",
    "SagaFailed",
    "SagaNotFound",
    "SerializationError",
    "ShoalError",
    "TaskCancelled",
    "TaskFailed",
    "TaskNotFound",
    "TaskTimeout",
    "UnknownAgentType",
    "__version__",
]
