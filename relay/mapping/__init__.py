"""The declarative mapping language: compiled routes turn one verified event into messages.

Owns: parsing rule tables from relay.toml into frozen, compiled rules (with errors that name the
full key path), and evaluating them against an event. Pure: no I/O, no clock, no randomness, so
the same event always maps to the same bytes (every retry sends what ingest stored).

Rule forms (see README, "Mapping rules"):
  scalar                      a constant ("polar", 1, true)
  { const = any }             a constant of any TOML type
  { path = "data.id" }        a dotted path into the event; `items[0].id` indexes arrays
  { first = ["a", "b"] }      the first path whose value is neither missing, null nor "";
                              an entry may be { template = "..." } (missing if it can't render)
  { template = "x:{data.id}" }  a string with `{path}` placeholders
  { sum = ["a", "b"] }        the sum of the numbers at the paths (missing if one is)
  options on any of those: default, type ("string"|"int"|"float"|"bool"),
  minor_to_major / major_to_minor = "<path of the currency code>" (by Polar's exponent),
  transform ("upper"|"lower"|"trim"|"empty_to_null"|"iso4217" on strings, "negate"|"abs" on
  numbers, or a list of them), required
  any other table             a nested JSON object, built recursively
Conditions (`when`): { path, eq | ne | in | not_in | exists | lt | le | gt | ge },
{ all = [...] }, { any = [...] }, { not = {...} }; a list means all of them. A route's condition
sees its lookups.
Lookups: a route may name stored messages (`[routes.lookup.<name>]` with a destination and an
idempotency-key template); ingest resolves them from the store before mapping, and rules read
them as `lookup.<name>.<field>` (missing when nothing was recorded).
"""

from relay.mapping.conditions import COMPARISONS, Condition, compile_condition
from relay.mapping.paths import (
    MISSING,
    Path,
    PathPart,
    RuleSyntaxError,
    format_path,
    lookup,
    parse_path,
)
from relay.mapping.routes import (
    REDACTED,
    Lookup,
    MapResult,
    Route,
    encode,
    map_event,
    redact,
    select,
)
from relay.mapping.templates import Template, compile_template
from relay.mapping.values import (
    OPTION_KEYS,
    SOURCE_KEYS,
    TRANSFORMS,
    TYPES,
    ObjectRule,
    ValueRule,
    compile_object,
    compile_value,
)

__all__ = [
    "COMPARISONS",
    "MISSING",
    "OPTION_KEYS",
    "REDACTED",
    "SOURCE_KEYS",
    "TRANSFORMS",
    "TYPES",
    "Condition",
    "Lookup",
    "MapResult",
    "ObjectRule",
    "Path",
    "PathPart",
    "Route",
    "RuleSyntaxError",
    "Template",
    "ValueRule",
    "compile_condition",
    "compile_object",
    "compile_template",
    "compile_value",
    "encode",
    "format_path",
    "lookup",
    "map_event",
    "parse_path",
    "redact",
    "select",
]
