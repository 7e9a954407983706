"""YAML for configuration files and `--set` values: plain data only, bounded, and errors in one short line.

Beyond PyYAML's `safe_load`: anchors and aliases are refused (a "billion laughs" file of a few hundred bytes expands
to gigabytes), a key given twice in one mapping is an error naming it, and every parse error (`!!python/...` tags
included) is one line of at most `MAX_MESSAGE` characters naming the source and the line.
"""

from __future__ import annotations

import contextlib

import yaml

MAX_MESSAGE = 200
MAX_NUMBER_CHARS = 100  # 2**63 has 19 digits
MAX_BYTES = 1_000_000  # a recipe is a few hundred bytes; a megabyte of YAML is not a recipe


class YamlError(ValueError):
    """A YAML text that is not plain configuration data."""


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise YamlError(f"line {event.start_mark.line + 1}: aliases (*{event.anchor}) are not allowed here")
        if getattr(event, "anchor", None):
            raise YamlError(f"line {event.start_mark.line + 1}: anchors (&{event.anchor}) are not allowed here")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # an unhashable key: let PyYAML say so
                if key in seen:
                    raise YamlError(f"line {key_node.start_mark.line + 1}: key {str(key)[:40]!r} is given twice")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if len(text) > MAX_NUMBER_CHARS:  # Python refuses to convert over 4300 digits, in words naming neither
            raise YamlError(
                f"line {node.start_mark.line + 1}: an integer of {len(text):,} characters; no setting takes one"
            )
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def load_yaml(text: str, source: str):
    """Parse `text` (from `source`, named in errors) as plain YAML data; a YamlError is one line."""
    if len(text) > MAX_BYTES:
        raise YamlError(_short(f"{source}: {len(text):,} bytes of YAML, more than a configuration holds"))
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506  (_Loader is a SafeLoader)
    except YamlError as e:
        problem = str(e)
    except yaml.constructor.ConstructorError as e:
        line = f"line {e.problem_mark.line + 1}:" if e.problem_mark else ""
        tag = (e.problem or "").split("'")[1] if "'" in (e.problem or "") else "a tag"
        problem = f"{line} {tag} is not plain data (only YAML scalars, lists, mappings)"
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        problem = f"not valid YAML:{line} {getattr(e, 'problem', None) or e}"
    except RecursionError:
        problem = "nested too deeply"
    raise YamlError(_short(f"{source}: {problem}")) from None  # `_short` also folds the spaces of an empty `line`
