"""MkDocs hooks: pages built from the code, so the docs cannot drift from it.

- `reference/api.md` is generated from the app's OpenAPI schema: `create_app(Settings(...))`
  with a throwaway data dir (no model is loaded, no server is started), then
  `app.openapi_schema.to_schema()`, rendered path by path with parameters, request body fields
  and responses, and every schema's fields.
- `<!-- settings-table -->` (operations.md) becomes a table of every `Settings` field: flag, env
  var, default, help, and the commands that take it (read from the real argument parsers).
- `<!-- readme-intro -->` (index.md) becomes README.md's introduction (the text between its title
  and its first `##` section), links into docs/ rewritten to site pages.
- `<!-- benchmark-results -->` (benchmarks.md) becomes a pymdownx.snippets include of
  benchmarks/RESULTS.md (less its title) when that file exists, else a note saying it does not.

Wired up in mkdocs.yml (`hooks: [docs/hooks.py]`); excluded from the site by `exclude_docs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[1]

API_PAGE = "reference/api.md"
SETTINGS_MARKER = "<!-- settings-table -->"
README_MARKER = "<!-- readme-intro -->"
RESULTS_MARKER = "<!-- benchmark-results -->"
RESULTS_FILE = "benchmarks/RESULTS.md"
HTTP_METHODS = ("get", "put", "post", "patch", "delete", "head", "options")


# -- mkdocs events ------------------------------------------------------------------------------
def on_config(config: MkDocsConfig) -> MkDocsConfig:
    # The source tree's server/ wins over an installed (or another checkout's editable) copy.
    # Here rather than at import: mkdocs puts sys.path back the way it was after loading a hook.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, API_PAGE, content=render_api_reference(openapi_schema())))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, render_settings_table())
    if README_MARKER in markdown:
        markdown = markdown.replace(README_MARKER, readme_intro(ROOT / "README.md"))
    if RESULTS_MARKER in markdown:
        markdown = markdown.replace(RESULTS_MARKER, benchmark_results(ROOT / RESULTS_FILE))
    return markdown


# -- the API reference --------------------------------------------------------------------------
def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of the app a default `loraforge serve` builds (no model loaded)."""
    from server.app import create_app
    from server.settings import Settings

    with tempfile.TemporaryDirectory(prefix="loraforge-docs-") as data_dir:
        app = create_app(Settings(data_dir=Path(data_dir)))
        # Round-trip through JSON: plain dicts and lists only, as a client of /openapi.json sees it.
        return json.loads(json.dumps(app.openapi_schema.to_schema(), default=str))


def render_api_reference(schema: dict[str, Any]) -> str:
    info = schema.get("info", {})
    components = schema.get("components", {}).get("schemas", {})
    out = [
        "# API reference",
        "",
        f"Generated from the OpenAPI {schema.get('openapi', '')} schema of "
        f"{info.get('title', 'the app')} {info.get('version', '')} when this site was built. A "
        "running server describes itself the same way at `GET /openapi.json` (and "
        "`/openapi.yaml`), with an interactive explorer at `/docs`. `GET /metrics` "
        "(Prometheus text) is left out of the schema; see [Operations](../operations.md).",
        "",
        "**Errors.** Every error response, whatever its status, is an OpenAI error object: "
        '`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`, where `message` '
        "says what to change and `param` names the field at fault. Each route lists the statuses "
        "it can answer: 401 only when the server has an API key (on `/v1/*`, `/fine-tunes*` and "
        "the tokenizer routes); 413 over `--max-body-mb` (JSON) "
        "or `--max-upload-mb` (uploads); 415 for a body that is not JSON on a JSON route. "
        "[Limits and failures](../operations.md#limits-and-failures) has the limits and every "
        "status, type and code.",
        "",
    ]
    for tag, operations in group_operations(schema).items():
        out += [f"## {tag.capitalize()}", ""]
        for paths, method, op in operations:
            out += render_operation(paths, method, op, components)
    if components:
        out += ["## Schemas", ""]
        for name in sorted(components):
            out += render_schema_section(name, components[name])
    return "\n".join(out).rstrip() + "\n"


def group_operations(schema: dict[str, Any]) -> dict[str, list[tuple[list[str], str, dict]]]:
    """Operations by their first tag, in schema order; the same operation mounted with and
    without the /v1 prefix (the legacy fine-tunes API) is listed once with both paths."""
    groups: dict[str, list[tuple[list[str], str, dict]]] = {}
    seen: dict[tuple[str, str, str], list[str]] = {}
    for path, item in schema.get("paths", {}).items():
        for method in HTTP_METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            key = (method, path.removeprefix("/v1"), op.get("summary", ""))
            if key in seen:
                seen[key].append(path)
                continue
            paths = [path]
            seen[key] = paths
            tag = (op.get("tags") or ["other"])[0]
            groups.setdefault(tag, []).append((paths, method, op))
    return groups


def render_operation(paths: list[str], method: str, op: dict, components: dict) -> list[str]:
    paths = sorted(paths, key=lambda p: (not p.startswith("/v1"), p))
    title = " · ".join(f"`{method.upper()} {p}`" for p in paths)
    out = [f"### {title}", ""]
    if op.get("description"):
        out += [op["description"].strip(), ""]
    elif op.get("summary"):  # Litestar's summary is the handler's name: "RetrieveModel"
        out += [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", op["summary"]).capitalize() + ".", ""]
    if op.get("deprecated"):
        out += ["*Deprecated.*", ""]

    params = op.get("parameters") or []
    if params:
        rows = []
        for p in params:
            s = p.get("schema", {})
            name = f"`{p['name']}`" + (" (required)" if p.get("required") else "")
            rows.append(
                (
                    name,
                    p.get("in", ""),
                    type_of(s),
                    default_of(s),
                    p.get("description") or s.get("description", ""),
                )
            )
        out += [
            "**Parameters**",
            "",
            *table(("Name", "In", "Type", "Default", "Description"), rows),
        ]

    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            s = content.get("schema", {})
            ref = ref_name(s)
            if ref:
                out += [f"**Request body** (`{media}`): {schema_link(ref)}", ""]
                out += fields_table(components.get(ref, {}))
            else:
                out += [f"**Request body** (`{media}`)", ""]
                out += fields_table(s)

    out += ["**Responses**", ""]
    for status, response in sorted(op.get("responses", {}).items()):
        out.append(f"- `{status}`: {response_text(status, response)}")
    out.append("")
    return out


def response_text(status: str, response: dict) -> str:
    if status[:1] in "45":  # an ErrorBody: its description says when the route answers it
        return f"an error object: {response.get('description', '')}".rstrip(": ")
    shapes = []
    for media, content in (response.get("content") or {}).items():
        shapes.append(type_of(content.get("schema", {})) + (f" (`{media}`)" if media else ""))
    return "; ".join(shapes) or response.get("description", "")


def fields_table(schema: dict) -> list[str]:
    props = schema.get("properties") or {}
    if not props:
        return []
    required = set(schema.get("required") or [])
    notes = field_notes().get(schema.get("title", ""), {})
    rows = []
    for name, s in props.items():
        label = f"`{name}`" + (" (required)" if name in required else "")
        about = " ".join(filter(None, [s.get("description", ""), notes.get(name, "")]))
        rows.append((label, type_of(s), default_of(s), about))
    return table(("Field", "Type", "Default", "Description"), rows)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A markdown table, leaving out the last column when no row fills it."""
    if rows and not any(r[-1] for r in rows):
        header, rows = header[:-1], [r[:-1] for r in rows]
    return [row(*header), row(*("---" for _ in header)), *(row(*r) for r in rows), ""]


def field_notes() -> dict[str, dict[str, str]]:
    """Schema name -> field -> what loraforge does with an OpenAI field it cannot honour (the
    request Structs' `unsupported` and `accepted_and_ignored` lists)."""
    from server.schemas.common import RequestBody

    found: dict[str, dict[str, str]] = {}
    todo = list(RequestBody.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        notes = {name: "Not supported by loraforge: a 400 if set." for name in cls.unsupported}
        notes.update({name: "Accepted and ignored." for name in cls.accepted_and_ignored})
        found[cls.__name__] = notes
    return found


def render_schema_section(name: str, schema: dict) -> list[str]:
    out = [f"### {name} {{ #{anchor(name)} }}", ""]
    if schema.get("description"):
        out += [schema["description"].strip(), ""]
    fields = fields_table(schema)
    return out + (fields or [f"Type: {type_of(schema)}", ""])


# -- schema -> text -----------------------------------------------------------------------------
def ref_name(schema: dict) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def anchor(name: str) -> str:
    return "schema-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def schema_link(name: str) -> str:
    return f"[`{name}`](#{anchor(name)})"


def type_of(schema: Any) -> str:
    """A short human reading of a JSON schema: `string`, `array of integer`, a link to a
    component, alternatives joined with "or"."""
    if not isinstance(schema, dict):
        return "any"
    if (ref := ref_name(schema)) is not None:
        return schema_link(ref)
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    for key in ("oneOf", "anyOf"):
        if key in schema:
            # An empty alternative is a route's "or anything else", e.g. an SSE stream.
            kinds = ["other (see the description)" if s == {} else type_of(s) for s in schema[key]]
            return " or ".join(dict.fromkeys(kinds))
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(type_of({**schema, "type": k}) for k in kind)
    if kind == "array":
        item = type_of(schema.get("items", {}))
        return f"array of ({item})" if " or " in item else f"array of {item}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"object of {type_of(extra)}"
        return "object"
    if kind == "string" and schema.get("format"):
        return f"string ({schema['format']})"
    return kind or "any"


def default_of(schema: dict) -> str:
    if "default" in schema:
        return f"`{json.dumps(schema['default'])}`"
    for key in ("oneOf", "anyOf"):
        for s in schema.get(key, []):
            if isinstance(s, dict) and "default" in s:
                return f"`{json.dumps(s['default'])}`"
    return ""


def row(*cells: object) -> str:
    return "| " + " | ".join(cell_text(c) for c in cells) + " |"


def cell_text(value: object) -> str:
    """One line for a table cell: `|` escaped, and `<`/`>` outside code spans too, so help text
    such as "<data-dir>/loraforge.db" shows instead of being read as an HTML tag."""
    parts = " ".join(str(value).split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


# -- the settings table -------------------------------------------------------------------------
def render_settings_table() -> str:
    """Every `Settings` field as flag, env var, default, meaning and the commands taking it."""
    from server.settings import Settings, env_var

    takers = settings_commands()
    rows = []
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            flag = f"{flag} / --no-{flag[2:]}"
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += " (" + ", ".join(f.metadata["choices"]) + ")"
        commands = ", ".join(f"`{c}`" for c in takers.get(f.name, [])) or "—"
        rows.append((f"`{flag}`", f"`{env_var(f.name)}`", setting_default(f), help_text, commands))
    header = ("Flag", "Environment variable", "Default", "Meaning", "Commands")
    return "\n".join(table(header, rows))


def setting_default(f: dataclasses.Field) -> str:
    if f.name == "database_url":
        return "`sqlite:///<data-dir>/loraforge.db`"
    if f.default is None:
        return "unset"
    if isinstance(f.default, (Path, str)):
        return f"`{f.default}`"
    return f"`{json.dumps(f.default)}`"


def settings_commands() -> dict[str, list[str]]:
    """Setting name -> the `loraforge` commands whose flag for it reads the env twin too."""
    from server.cli.main import build_parser
    from server.settings import env_var

    found: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}  # "loraforge jobs" -> its leaf commands
    for command, parser in subcommands(build_parser()):
        groups.setdefault(command.rsplit(" ", 1)[0], []).append(command)
        for action in parser._actions:
            if action.help and f"env {env_var(action.dest)}" in action.help:
                found.setdefault(action.dest, []).append(command)
    # All of a group's several commands take it: say `loraforge jobs ...` once.
    for parent, leaves in groups.items():
        if len(leaves) > 1 and parent != "loraforge":
            for name, commands in found.items():
                if set(leaves) <= set(commands):
                    found[name] = [c for c in commands if c not in leaves] + [f"{parent} ..."]
    return found


def subcommands(parser: argparse.ArgumentParser, prefix: str = "loraforge"):
    """(command line, parser) for every leaf subcommand, e.g. ("loraforge db upgrade", ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for sub in subs:
        for name, child in sub.choices.items():
            yield from subcommands(child, f"{prefix} {name}")


# -- README intro and benchmark results ---------------------------------------------------------
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def readme_intro(readme: Path) -> str:
    """README's text between its `# ` title and its first `## ` section; links into docs/ point
    at the site's pages, other relative links (files outside docs/) become plain text."""
    if not readme.is_file():
        return ""
    lines = readme.read_text(encoding="utf-8").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))

    def relink(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        if re.match(r"[a-z]+:|#", target):  # absolute URL or an anchor
            return m.group(0)
        if target.startswith("docs/"):
            return f"[{text}]({target.removeprefix('docs/')})"
        return text  # a file outside docs/ has no page on the site

    return _LINK.sub(relink, "\n".join(lines[start:end]).strip())


def benchmark_results(results: Path) -> str:
    """A snippet include of RESULTS.md without its `# ` title (the page has one), whose `##`
    sections become the page's; without the file, a `## Results` section saying so."""
    if not results.is_file():
        return (
            f"## Results\n\nNo recorded results in this checkout (`{RESULTS_FILE}` does not "
            "exist yet): run the scripts below on your machine and keep their JSON."
        )
    lines = results.read_text(encoding="utf-8").splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), 0)
    if lines and lines[first].startswith("# "):
        return f'--8<-- "{RESULTS_FILE}:{first + 2}"'  # 1-based: from the line after the title
    return f'--8<-- "{RESULTS_FILE}"'
