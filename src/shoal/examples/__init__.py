"""The bundled example apps, installed with Shoal; ``shoal up`` and ``shoal demo`` run them.

- ``shoal.examples.pipeline``: a document pipeline (``process_document``) that fans
  chunks out to stateful ``summarizer/<k>`` agents and joins their summaries.
- ``shoal.examples.chat``: ``chat/<user>`` agents with per-user memory that call the
  ``calculate`` capability and the pipeline.
- ``shoal.examples.workload``: deterministic sample documents and chat lines.

``shoal node --app shoal.examples`` hosts both apps; ``--app shoal.examples.pipeline``
or ``--app shoal.examples.chat`` hosts one (the chat brings the pipeline it calls).
"""

from __future__ import annotations

from shoal.agent import Agent
from shoal.examples import chat, pipeline

agents: list[type[Agent]] = list(dict.fromkeys([*pipeline.agents, *chat.agents]))
