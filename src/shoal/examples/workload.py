"""Deterministic sample inputs for the bundled examples (``shoal demo`` uses them).

``documents(n)`` gives n documents of 2-4 paragraphs drawn from a small built-in
corpus; ``chat_script(users, turns)`` gives the lines a few users type, in the
order to send them. The same arguments always give the same inputs, so a run can
be checked (``pipeline.expected_summary``) and compared with another.
"""

from __future__ import annotations

PARAGRAPHS = [
    "Tides follow the pull of the Moon and the Sun. The Moon is closer, so its pull on "
    "the oceans is stronger. Spring tides come when the Sun and the Moon pull together. "
    "Neap tides come when they pull at right angles.",
    "Coral reefs grow in warm and clear water. Reefs shelter a quarter of all marine "
    "species. When the water stays too warm, corals expel their algae and bleach. "
    "Bleached reefs can recover if the water cools in time.",
    "Kelp forests grow along cold coasts. Kelp can grow half a metre in a day. Otters eat "
    "the urchins that graze on kelp, so otters keep kelp forests standing.",
    "Deep sea vents pour out hot water rich in minerals. Bacteria at the vents live on "
    "chemicals instead of sunlight. Whole communities of worms and shrimp feed on those "
    "bacteria, far from any light.",
    "Whales sing songs that travel for hundreds of kilometres. Humpback songs change from "
    "year to year, and whales in one ocean sing the same song. Young whales learn the song "
    "from older whales.",
    "Mangroves grow where rivers meet the sea. Their roots trap mud and slow the waves. "
    "Mangrove roots protect coasts from storms and shelter young fish. Many fish that "
    "live on reefs spend their first months among mangrove roots.",
    "Sea ice forms when the ocean freezes in winter. The ice reflects sunlight back to "
    "space. Less sea ice means the dark ocean absorbs more sunlight and warms further.",
    "Plankton drift with the currents. Tiny plankton make half of the oxygen we breathe. "
    "Plankton feed fish, and fish feed seabirds and seals, so plankton carry the whole "
    "food web of the ocean.",
]

NAMES = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken"]
FAVOURITES = ["colour is blue", "fish is the sunfish", "coast is rocky", "tide is neap"]

CHAT_LINES = [  # one round of a conversation; {name}, {fact}, {a}..{c}, {paragraph} vary
    "hi",
    "my name is {name}",
    "remember that my favourite {fact}",
    "calculate: {a} * {b} + {c}",
    "what is my name?",
    "summarize: {paragraph}",
    "what do you remember?",
    "what did I say?",
]


def document(i: int) -> tuple[str, str]:
    """Document ``i``: 2-4 paragraphs of the corpus (one chunk each), in an order that
    differs from one document to the next."""
    count = 2 + i % 3
    picked = [PARAGRAPHS[(i * 3 + j * 5) % len(PARAGRAPHS)] for j in range(count)]
    return f"doc-{i:04d}", "\n\n".join(picked)


def documents(n: int) -> list[tuple[str, str]]:
    """``n`` documents as ``(doc_id, text)``; ids are ``doc-0000``, ``doc-0001``, ..."""
    return [document(i) for i in range(n)]


def user_id(u: int) -> str:
    """A user's id, usable as an agent key (``chat/<user id>``)."""
    return f"user-{u:02d}"


def chat_line(u: int, t: int) -> str:
    """What user ``u`` types at turn ``t`` (0-based)."""
    template = CHAT_LINES[t % len(CHAT_LINES)]
    rounds = t // len(CHAT_LINES)
    return template.format(
        name=NAMES[(u + rounds) % len(NAMES)],
        fact=FAVOURITES[(u + rounds) % len(FAVOURITES)],
        a=u + 2,
        b=t + 3,
        c=rounds,
        paragraph=PARAGRAPHS[(u + t) % len(PARAGRAPHS)],
    )


def chat_script(users: int, turns: int) -> list[tuple[str, str]]:
    """``users`` users typing ``turns`` lines each, as ``(user id, text)`` in rounds
    (every user's first line, then every user's second, ...). Each user's lines
    must reach ``chat/<user id>`` in this order; different users are independent."""
    return [(user_id(u), chat_line(u, t)) for t in range(turns) for u in range(users)]
