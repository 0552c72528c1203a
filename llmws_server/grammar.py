"""The grammar of the JSON a schema allows, as llguidance compiles it: one definition for the core's check
(core/constraints.py) and every engine's constrained decoding."""
import json

import llguidance

# JSON as json.dumps writes it: whitespace only after separators, so no model can fill an answer with it
COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def grammar(schema: dict) -> str:
    return llguidance.grammar_from("json_schema", json.dumps({**schema, "x-guidance": COMPACT}))
