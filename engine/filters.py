"""Metadata filters: what a filter may say, what it means, and a document's rows in the
store's metadata index (engine/store.py finds a filter's documents through them).

A filter maps metadata field -> condition; every field's condition must hold. A condition is
a value (equality, as before) or a mapping of operators, all of which must hold:

    {"lang": "en"}                                  equal (values compare as meta_str does)
    {"lang": {"$in": ["en", "fr"]}}                 one of these
    {"lang": {"$ne": "de"}}, {"$nin": ["de", "it"]} not this / none of these (a document
                                                    without the field passes)
    {"year": {"$gte": 2020, "$lt": 2024}}           a range: a bound that reads as a number
                                                    compares numerically with values that
                                                    do (numbers, and strings such as "2020");
    {"date": {"$gte": "2024-01-01"}}                any other bound compares as text (code
                                                    point order: ISO dates sort as dates)
                                                    with the values that do not read as numbers
    {"tags": {"$contains": "news"}}                 a list value holding this element (a
    {"tags": {"$contains": ["news", "eu"]}}         value that is not a list counts as a list
    {"tags": {"$contains_any": ["news", "eu"]}}     of itself); every one / at least one of
                                                    these (to ask for an element that is
                                                    itself a list, wrap it: [["a", "b"]])

Conditions on several fields may also be combined with logical operators, at any depth:

    {"$or": [{"lang": "fr"}, {"year": {"$gte": 2022}}]}   at least one of these filters holds
    {"$and": [{"$or": [...]}, {"$or": [...]}]}            every one of these holds
    {"$not": {"tags": {"$contains": "draft"}}}             this filter does not hold
    {"$not": [{"lang": "de"}, {"year": {"$lt": 2000}}]}   none of these holds

beside the field conditions of the same mapping, which hold as well. Other top-level keys
starting with "$" are refused (metadata fields so named cannot be filtered on).

A field name is a top-level metadata key or, where the metadata has no such key, a path
through nested objects split at its dots (at most MAX_PATH_PARTS parts): {"author.name":
"Ann"} matches {"author": {"name": "Ann"}}. A path through a list goes into the list's
objects, its value the list of what it finds there (lookup).

Values compare as the gRPC API sends them: strings as they are, other JSON as json.dumps
(meta_str), so 2020 and "2020" are equal. A mapping with a key that starts with "$" holds
operators (every key must be one); one with no such key is a JSON object value compared for
equality.
`check_filter` turns any accepted form into one canonical form, {field: {op: operand}},
with $eq/$ne operands as meta_str, $in/$nin/$contains/$contains_any as lists of them (no
null in the last two: a list's null elements are not indexed) and range bounds as floats
(numbers) or strings, and "$or" / "$and" / "$not" as lists of canonical filters, which every consumer
(matches, the store's SQL, Ray shards) reads.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Iterator

from .errors import InvalidInput

EQUALITY_OPS = ("$eq", "$ne", "$in", "$nin")
LIST_OPS = ("$contains", "$contains_any")  # elements of a list value: every one / at least one
LOGICAL_OPS = ("$or", "$and", "$not")  # top-level keys of a filter that combine whole filters
RANGE_OPS = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
OPS = (*EQUALITY_OPS, *LIST_OPS, *RANGE_OPS)
# Values longer than this are left out of the metadata index (a filter on one reads every
# document's metadata), and only a string this short reads as a number.
META_INDEX_MAX_CHARS = 256
MAX_PATH_PARTS = 8  # a dotted field name reaches at most this deep into nested objects
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def meta_str(v) -> str | None:
    """How a metadata value compares in a filter: as a string, JSON for non-strings (as the
    gRPC API sends values); None for a missing or null one."""
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def meta_wire(v) -> str:
    """A metadata value as the gRPC API's map<string, string> carries it: meta_str, and a
    null as "null"."""
    s = meta_str(v)
    return "null" if s is None else s


def meta_num(s: str | None) -> float | None:
    """The number a value (meta_str) reads as, for numeric ranges: a finite decimal number
    of at most META_INDEX_MAX_CHARS characters; None if it does not read as one."""
    if s is None or len(s) > META_INDEX_MAX_CHARS or not _NUMBER.fullmatch(s):
        return None
    n = float(s)
    return n if math.isfinite(n) else None


def _operand(field: str, op: str, x):
    if op in ("$eq", "$ne"):
        return meta_str(x)
    if op in ("$in", "$nin"):
        if not isinstance(x, (list, tuple)) or not x:
            raise InvalidInput(f"filter field {field!r}: {op} takes a non-empty list of values, got {x!r}")
        return sorted({meta_str(v) for v in x}, key=lambda s: (s is None, s or ""))
    if op in LIST_OPS:
        items = x if isinstance(x, (list, tuple)) else [x]
        if not items or (op == "$contains_any" and not isinstance(x, (list, tuple))):
            raise InvalidInput(f"filter field {field!r}: {op} takes a non-empty list of values"
                               f"{' (or one value)' if op == '$contains' else ''}, got {x!r}")
        if any(v is None for v in items):
            raise InvalidInput(f"filter field {field!r}: {op} takes values, not null (a list's null elements "
                               "are never matched)")
        return sorted({meta_str(v) for v in items})
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise InvalidInput(f"filter field {field!r}: {op} takes a number or a string, got {x!r}")
    if isinstance(x, str):
        n = meta_num(x)
        return x if n is None else n
    if not math.isfinite(x):
        raise InvalidInput(f"filter field {field!r}: {op} takes a finite number, got {x!r}")
    return float(x)


class Filter(dict):
    """A filter in canonical form, as check_filter returns it (and passes on unchanged)."""


def check_filter(filter) -> Filter | None:
    """The canonical form of a filter (see the module docstring), or None for no filter;
    InvalidInput naming what to fix for anything else."""
    if isinstance(filter, Filter):
        return filter or None
    if filter is not None and not isinstance(filter, dict):
        raise InvalidInput("filter must be a mapping of metadata field -> value or {operator: operand}")
    out = Filter()
    for field, cond in (filter or {}).items():
        if not isinstance(field, str) or not field:
            raise InvalidInput(f"filter field names must be non-empty strings, got {field!r}")
        if field.startswith("$"):
            out[field] = _alternatives(field, cond)
            continue
        ops = cond if isinstance(cond, dict) and any(isinstance(o, str) and o.startswith("$") for o in cond) else None
        if ops is None:
            out[field] = {"$eq": meta_str(cond)}
            continue
        unknown = [o for o in ops if o not in OPS]
        if unknown:
            raise InvalidInput(f"filter field {field!r}: unknown operator {unknown[0]!r}; use one of "
                               f"{', '.join(OPS)} (a value with keys not starting with '$' is an object to equal)")
        canon = {op: _operand(field, op, x) for op, x in ops.items()}
        kinds = {type(x) for op, x in canon.items() if op in RANGE_OPS}
        if len(kinds) > 1:
            raise InvalidInput(f"filter field {field!r}: range bounds must all be numbers or all text, got "
                               f"{ {op: ops[op] for op in canon if op in RANGE_OPS} }")
        out[field] = canon
    return out or None


def _alternatives(key: str, filters) -> list:
    """The canonical filters of a top-level logical operator ($or / $and / $not; $not also
    takes one filter as it is)."""
    if key not in LOGICAL_OPS:
        raise InvalidInput(f"unknown filter operator {key!r} at the top of a filter; use $or, $and or $not to "
                           "combine filters (metadata fields whose names start with '$' cannot be filtered on)")
    if key == "$not" and isinstance(filters, dict):
        filters = [filters]
    if not isinstance(filters, (list, tuple)) or not filters:
        raise InvalidInput(f"filter {key} takes a non-empty list of filters, got {filters!r}")
    return group_parts(f"filter {key}", filters, check_filter, f"every filter in {key} needs a condition")


def group_parts(name: str, items, convert, fix: str) -> list:
    """Each filter of a group ($or, $and, or a gRPC message's any_of_filters) as `convert`
    reads it, an error naming `name[i]`; an empty one refused (`fix`: what to give it)."""
    out = []
    for i, f in enumerate(items):
        try:
            part = convert(f)
        except InvalidInput as e:
            raise InvalidInput(f"{name}[{i}]: {e}") from None
        if not part:
            raise InvalidInput(f"{name}[{i}] is empty; {fix}")
        out.append(part)
    return out


def operators(filter: dict | None) -> set[str]:
    """Every operator a canonical filter uses, in its $or / $and / $not groups too."""
    out = set()
    for f, cond in (filter or {}).items():
        if f in LOGICAL_OPS:
            out |= {f}.union(*(operators(g) for g in cond))
        else:
            out |= set(cond)
    return out


def fields(filter: dict) -> dict:
    """A canonical filter's field conditions alone (without $or / $and / $not)."""
    return {f: c for f, c in filter.items() if f not in LOGICAL_OPS}


def both(a, b) -> Filter | None:
    """Two filters that must both hold, as one (e.g. a batch's filter and one query's own);
    an operator both give a field with different operands is InvalidInput, except the list
    operators, which hold together ($contains: every element of both)."""
    a, b = check_filter(a), check_filter(b)
    if not a or not b:
        return a or b
    out = Filter({f: dict(cond) if f not in LOGICAL_OPS else list(cond) for f, cond in a.items()})
    if "$and" in b:
        out["$and"] = [*out.get("$and", ()), *b["$and"]]
    if "$not" in b:  # none of either's
        out["$not"] = [*out.get("$not", ()), *b["$not"]]
    if "$or" in b:
        if "$or" in out:  # two groups of alternatives, each of which must hold
            out["$and"] = [*out.get("$and", ()), Filter({"$or": b["$or"]})]
        else:
            out["$or"] = b["$or"]
    for field, cond in fields(b).items():
        have = out.setdefault(field, {})
        for op, x in cond.items():
            if op == "$contains" and op in have:  # every element of both
                have[op] = sorted({*have[op], *x})
                continue
            if op == "$contains_any" and op in have and have[op] != x:  # one of each: two conditions
                out["$and"] = [*out.get("$and", ()), Filter({field: {op: x}})]
                continue
            if op in have and have[op] != x:
                raise InvalidInput(f"filter field {field!r}: {op} is given twice ({have[op]!r} and {x!r}); "
                                   "a query's own filter and the batch's must not disagree")
            have[op] = x
    return check_filter(dict(out))


def elements(v) -> set[str]:
    """What $contains / $contains_any look for in a metadata value: a list's elements (as
    meta_str, null ones left out), a value that is not a list itself; nothing for null."""
    return {s for s in map(meta_str, v if isinstance(v, list) else [v]) if s is not None}


def holds(v, op: str, x) -> bool:
    """Whether a metadata value (None: missing or null) satisfies one canonical operator."""
    if op in LIST_OPS:
        have = elements(v)
        return (all if op == "$contains" else any)(e in have for e in x)
    s = meta_str(v)
    if op == "$eq":
        return s == x
    if op == "$ne":
        return s != x
    if op == "$in":
        return s in x
    if op == "$nin":
        return s not in x
    n = meta_num(s)
    if isinstance(x, float):
        return n is not None and RANGE_OPS[op](n, x)
    return s is not None and n is None and RANGE_OPS[op](s, x)


def lookup(metadata: dict, field: str):
    """A field's value in a document's metadata: the top-level key `field`, else the value at
    its dotted path through nested objects; None where there is neither. A path that passes
    through a list goes into the list's objects: its value is then the list of what it
    finds in them (elements that are not objects, or lack the key, skipped; lists found at
    the end spliced in), so {"authors.name": {"$contains": "Ann"}} matches
    {"authors": [{"name": "Ann"}, {"name": "Bob"}]}."""
    if field in metadata:
        return metadata[field]
    parts = field.split(".")
    if not 1 < len(parts) <= MAX_PATH_PARTS:
        return None
    nodes, through = [metadata], False
    for part in parts:
        found = []
        for node in nodes:
            if isinstance(node, dict):
                if part in node:
                    found.append(node[part])
            elif isinstance(node, list):
                through = True
                found += [e[part] for e in node if isinstance(e, dict) and part in e]
        if not found:
            return None
        nodes = found
    if not through:
        return nodes[0]
    return [x for v in nodes for x in (v if isinstance(v, list) else [v])]


def paths(metadata: dict) -> Iterator[tuple[str, object]]:
    """Every field name a filter can give a value of this metadata by, with that value
    (lookup): the top-level keys and the dotted paths into nested objects, and into the
    objects of lists, that no top-level key shadows (null values left out of the paths)."""
    yield from metadata.items()
    seen = set(metadata)
    todo = [(k, [v], 1) for k, v in metadata.items() if isinstance(v, (dict, list))]
    while todo:
        prefix, nodes, depth = todo.pop()
        children: dict[str, list] = {}  # key -> the values under it, in every node
        for node in nodes:
            for obj in (node,) if isinstance(node, dict) else (e for e in node if isinstance(e, dict)):
                for k, v in obj.items():
                    children.setdefault(k, []).append(v)
        for k, found in children.items():
            path = f"{prefix}.{k}"
            if path in seen:
                continue
            seen.add(path)
            value = lookup(metadata, path)
            if value is not None:
                yield path, value
            nested = [v for v in found if isinstance(v, (dict, list))]
            if nested and depth + 1 < MAX_PATH_PARTS:
                todo.append((path, nested, depth + 1))


def matches(metadata: dict, filter: dict) -> bool:
    """Whether a document's metadata satisfies a canonical filter (check_filter)."""
    if not all(holds(lookup(metadata, f), op, x)
               for f, cond in filter.items() if f not in LOGICAL_OPS for op, x in cond.items()):
        return False
    if "$and" in filter and not all(matches(metadata, g) for g in filter["$and"]):
        return False
    if "$not" in filter and any(matches(metadata, g) for g in filter["$not"]):
        return False
    return "$or" not in filter or any(matches(metadata, g) for g in filter["$or"])


def meta_rows(doc_id: str, metadata: dict) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """A document's rows in the metadata index: (field, meta_str value, doc_id, meta_num)
    for every field (top-level, or a dotted path into nested objects: paths) whose value is
    not null and, as a string, at most META_INDEX_MAX_CHARS long; (field, doc_id) for each
    field whose value is longer (left out, so a text range on that field knows to read the
    documents instead); and (field, element, doc_id) for each element of a list value that
    is not null and at most META_INDEX_MAX_CHARS long as meta_str (what $contains finds
    besides the values that are not lists, which are rows of the first kind)."""
    rows, long, items = [], [], []
    for f, v in paths(metadata):
        s = meta_str(v)
        if s is None:
            continue
        if len(s) <= META_INDEX_MAX_CHARS:
            rows.append((f, s, doc_id, meta_num(s)))
        else:
            long.append((f, doc_id))
        if isinstance(v, list):
            items += [(f, e, doc_id) for e in sorted(elements(v)) if len(e) <= META_INDEX_MAX_CHARS]
    return rows, long, items
