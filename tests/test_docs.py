"""The docs cannot rot silently: every command in README.md and docs/*.md names keys, flags,
config presets and make targets that exist, and every relative link (and #anchor) resolves.

What counts as a command: each line of a ```bash / ```sh / ``` block (continuations joined,
comments dropped), and each inline `code span` of the prose that starts with a program
(`python`, `torchrun`, `make`, `snoo-train`, `launch/...`, `sbatch`, `docker run`). The
references are independent of the code that reads them: the config dataclasses of
snoo_train/config.py walked field by field, the group files under snoo_train/configs/groups/,
each script's own `add_argument` calls read with `ast`, and the Makefile's targets and variables.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import snoo_train.config as config_module

REPO = Path(__file__).resolve().parents[1]
GROUPS = REPO / "snoo_train" / "configs" / "groups"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(\S*)")
COMMAND_LANGS = {"", "bash", "sh", "shell", "console"}
# The programs whose commands are checked (by the last part of their path).
PROGRAMS = {"python", "python3", "torchrun", "make", "snoo-train", "sbatch", "docker", "torchrun.sh", "slurm.sbatch"}
# The Hydra command-line flags the training entry point takes besides overrides (flag -> takes a value).
HYDRA_FLAGS = {"-m": False, "--multirun": False, "--help": False, "-h": False, "--info": False,
               "--cfg": True, "-c": True, "--config-dir": True, "-cd": True, "--config-name": True,
               "-cn": True, "--config-path": True, "-cp": True}  # fmt: skip
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REPO_PATH = re.compile(r"^(?:snoo_train|tests|bench|launch|docker|requirements|\.ci)/[\w./-]*$")


# ---------------------------------------------------------------- reading the markdown


def prose_and_blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[str, int, list[str]]]]:
    """(line number, line) of the prose outside fences, and (language, first line, lines) of
    every fenced block."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.split("\n"), 1):
        fence = FENCE.match(line)
        if block is None and fence:
            block = (fence.group(1).lower(), number + 1, [])
        elif block is not None and line.strip().startswith("```"):
            blocks.append(block)
            block = None
        elif block is not None:
            block[2].append(line)
        else:
            prose.append((number, line))
    return prose, blocks


def inline_spans(prose: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Each `code span` of the prose with the line it starts on; a span may wrap over lines
    of one paragraph."""
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            joined = "\n".join(text for _, text in paragraph)
            for match in re.finditer(r"`([^`]+)`", joined):
                start = paragraph[0][0] + joined.count("\n", 0, match.start())
                yield start, match.group(1).replace("\n", " ")
        paragraph = []


def block_commands(start: int, lines: list[str]) -> Iterator[tuple[int, str]]:
    """Logical lines of a shell block (a trailing backslash continues the line)."""
    pending, first = "", start
    for number, line in enumerate(lines, start):
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def runs_a_program(command: str) -> bool:
    """Whether a line of a block or a code span is a command this test checks."""
    words = [w for w in command.split() if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    return bool(words) and Path(words[0]).name in PROGRAMS


def commands(text: str) -> Iterator[tuple[int, str]]:
    prose, blocks = prose_and_blocks(text)
    for lang, start, lines in blocks:
        if lang in COMMAND_LANGS:
            yield from ((n, c) for n, c in block_commands(start, lines) if runs_a_program(c))
    for number, span in inline_spans(prose):
        if runs_a_program(span):
            yield number, span


def headings(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text (duplicates get -1, -2, ...)."""
    prose, _ = prose_and_blocks(text)
    seen: dict[str, int] = {}
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, -1) + 1
            seen[slug] = count
            if count:
                seen[f"{slug}-{count}"] = 0
    return set(seen)


# ---------------------------------------------------------------- the references


@dataclasses.dataclass
class Interface:
    """What one entry point accepts: a Hydra schema (its root dataclass), argparse flags, or both."""

    name: str
    schema: type | None = None  # Hydra overrides are checked against this dataclass tree
    flags: frozenset[str] = frozenset()
    argparse: bool = False
    keys: frozenset[str] = frozenset()  # key=value arguments of the tool's own, beside the schema's


def argparse_of(path: Path) -> tuple[frozenset[str], bool]:
    """The option strings of every add_argument call in a file, and whether it takes a
    positional `overrides` (Hydra overrides after the flags)."""
    flags, overrides = {"-h", "--help"}, False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            flags.update(n for n in names if n.startswith("-"))
            overrides |= "overrides" in names
    return frozenset(flags), overrides


def declared_cli(path: Path) -> tuple[frozenset[str], frozenset[str]] | None:
    """A tool that parses its own arguments around the trainer's overrides declares them in
    module-level CLI_OPTIONS and CLI_KEYS tuples (snoo_train/plan/__main__.py)."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and getattr(node.targets[0], "id", "") in ("CLI_OPTIONS", "CLI_KEYS"):
            found[node.targets[0].id] = frozenset(ast.literal_eval(node.value))
    return (found.get("CLI_OPTIONS", frozenset()), found.get("CLI_KEYS", frozenset())) if found else None


def hydra_schema_of(path: Path) -> type | None:
    """The schema a module composes: `@hydra.main` is the training entry point (Config); the
    data tools name theirs in `run_tool(name, Schema, ...)` / `compose_job(name, args, Schema)`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "main" and getattr(node.value, "id", "") == "hydra":
            return config_module.Config
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("run_tool", "compose_job"):
            for arg in node.args:
                if isinstance(arg, ast.Name) and dataclasses.is_dataclass(getattr(config_module, arg.id, None)):
                    return getattr(config_module, arg.id)
    return None


@cache
def interface(target: str) -> Interface | str:
    """A module (`snoo_train.export`) or script (`bench/comm.py`) of this repository, or an error."""
    if target.endswith(".py"):
        path = REPO / target
    else:
        base = REPO / Path(*target.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__main__.py"
    if not path.is_file():
        return f"`{target}` does not exist ({path.relative_to(REPO)})"
    declared = declared_cli(path)
    if declared is not None:  # its overrides are the trainer's (compose_training_config)
        return Interface(target, config_module.Config, declared[0], argparse=True, keys=declared[1])
    schema = hydra_schema_of(path)
    flags, overrides = argparse_of(path)
    if schema is None and overrides:
        # bench scripts compose the training config from their overrides (bench/common.py)
        schema = config_module.Config
    return Interface(target, schema, flags, argparse=schema is None or overrides)


@cache
def makefile() -> tuple[frozenset[str], frozenset[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, flags=re.M))
    variables = set(re.findall(r"^(\w+)\s*[?:+]?=", text, flags=re.M))
    return frozenset(targets), frozenset(variables)


# ---------------------------------------------------------------- checking one command


def check_key(key: str, schema: type) -> str | None:
    """None when `a.b.c` is a field path of the dataclass tree `schema`, else what is wrong."""
    node: object = schema()
    for depth, part in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(node):
            return f"`{key}`: `{'.'.join(key.split('.')[:depth])}` has no sub-keys"
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            return f"`{key}` is not a key of snoo_train.config.{schema.__name__}"
        node = getattr(node, part)
    return None


def check_override(token: str, schema: type, user_configs: bool) -> str | None:
    """One Hydra override (`a.b=v`, `+a=v`, `++a=v`, `~a`): its key exists, and a config group's
    options are files under snoo_train/configs/groups/<group>/ (unless --config-dir adds its own)."""
    token = re.sub(r"^(\+{0,2})checkpoint\.async=", r"\1checkpoint.async_save=", token)  # the CLI alias
    key, _, value = token.lstrip("+~").partition("=")
    if key == "hydra" or key.startswith("hydra."):
        return None
    fields = {f.name for f in dataclasses.fields(schema)}
    if "." not in key and (GROUPS / key).is_dir() and (key in fields or schema is config_module.Config):
        if user_configs:
            return None
        for option in re.sub(r"^choice\((.*)\)$", r"\1", value).split(","):
            if not (GROUPS / key / f"{option}.yaml").is_file():
                return f"`{key}={option}`: no snoo_train/configs/groups/{key}/{option}.yaml"
        return None
    return check_key(key, schema)


def check_arguments(entry: Interface, args: list[str]) -> Iterator[str]:
    """The arguments after an entry point: flags against its argparse flags (or Hydra's own),
    the rest as Hydra overrides against its schema."""
    user_configs = "--config-dir" in args or "-cd" in args
    takes_value = False
    for arg in args:
        if takes_value:
            takes_value = False
            continue
        if arg.startswith("-") and not re.match(r"^-\d", arg):
            flag = arg.split("=", 1)[0]
            if entry.argparse and flag in entry.flags:
                continue
            if not entry.argparse and (flag in ("-h", "--help") or entry.schema is config_module.Config and flag in HYDRA_FLAGS):
                takes_value = HYDRA_FLAGS[flag] and "=" not in arg
                continue
            yield f"`{flag}` is not an option of {entry.name}"
        elif arg.partition("=")[0] in entry.keys:
            continue
        elif entry.schema is not None and ("=" in arg or arg.startswith("~")):
            problem = check_override(arg, entry.schema, user_configs)
            if problem:
                yield problem
        elif PROSE_KEY.match(arg) and "=" in arg:
            yield f"`{arg}`: {entry.name} takes no Hydra overrides"
        elif not entry.argparse:
            yield f"`{arg}` is neither an option nor a key=value override of {entry.name}"


def check_make(args: list[str]) -> Iterator[str]:
    targets, variables = makefile()
    for arg in args:
        name, is_var, value = arg.partition("=")
        if is_var and name not in variables:
            yield f"`{name}` is not a variable of the Makefile"
        elif not is_var and arg not in targets:
            yield f"`make {arg}`: no such target in the Makefile"
        elif name == "ARGS":
            yield from check_arguments(interface("snoo_train.train"), shlex.split(value))


def entry_point(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(the module, script or `make` a command runs, its arguments), or None for a command
    this test does not check (pip, git, python -c, a module outside this repository)."""
    while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
        tokens = tokens[1:]  # environment assignments
    program = Path(tokens[0]).name if tokens else ""
    if program == "make":
        return "make", tokens[1:]
    if program == "snoo-train":
        return "snoo_train.train", tokens[1:]
    if program not in PROGRAMS:
        return None
    for i, token in enumerate(tokens):
        if token.endswith(("launch/torchrun.sh", "launch/slurm.sbatch")):
            return "snoo_train.train", tokens[i + 1 :]
        if token == "-c" and program.startswith("python"):
            return None
        if token == "-m" and i + 1 < len(tokens):
            module = tokens[i + 1]
            return (module, tokens[i + 2 :]) if module.split(".")[0] in ("snoo_train", "tests", "bench") else None
        if token.endswith(".py") and program != "docker":
            return token, tokens[i + 1 :]
    return None


def check_command(command: str) -> Iterator[str]:
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError as err:
        yield f"cannot split the command ({err})"
        return
    found = entry_point(tokens)
    if found is None:
        return
    target, args = found
    if target == "make":
        yield from check_make(args)
        return
    entry = interface(target)
    if isinstance(entry, str):
        yield entry
        return
    yield from check_arguments(entry, args)


# Keys the docs spell wrong on purpose, to show the error a misspelling gets.
MISSPELLED_ON_PURPOSE = {"trainer.max_step"}
FILE_NAME = re.compile(r"\.(py|sh|safetensors|jsonl?|ya?ml|md|txt|bin|idx|pickle|png|pt)$")
PROSE_KEY = re.compile(r"^[+~]{0,2}([a-z_]+)((?:\.\w+)*)(=.*)?$")


def prose_keys(span: str) -> Iterator[str]:
    """The config keys a code span of the prose names (`optim.k`, `data=prepared data.path=DIR`,
    `model=llama_tiny\\|llama_small`), as overrides: a key alone, or key=option per option."""
    for token in span.split():
        match = PROSE_KEY.match(token)
        if not match or not (match.group(2) or match.group(3)):
            continue
        key = match.group(1) + match.group(2)
        if FILE_NAME.search(key):
            continue  # model.safetensors, checkpoint.py
        options = [o for o in re.split(r"\\?\||,", (match.group(3) or "=")[1:]) if o]
        yield from [f"{key}={option}" for option in options] or ([key] if match.group(2) else [])


def check_prose_keys(prose: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Keys named in the prose and tables (not commands) exist too: the training schema's, or
    a data tool's section (`prepare.*`, `tokenizer.*`). Other dotted names are not keys."""
    roots = {f.name: config_module.Config for f in dataclasses.fields(config_module.Config)}
    roots.update({"experiment": config_module.Config, "prepare": config_module.PrepareJob,
                  "tokenizer": config_module.TokenizerJob})  # fmt: skip
    for number, span in inline_spans(prose):
        if runs_a_program(span):
            continue
        for override in prose_keys(span):
            root = override.split(".")[0].split("=")[0]
            if root in roots and override.split("=")[0] not in MISSPELLED_ON_PURPOSE:
                problem = check_override(override, roots[root], user_configs=False)
                if problem:
                    yield number, problem


# ---------------------------------------------------------------- checking one document


def check_links(path: Path, text: str) -> Iterator[tuple[int, str]]:
    """Relative links resolve from the document's folder; an #anchor names a heading."""
    prose, _ = prose_and_blocks(text)
    for number, line in prose:
        for match in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve()
            if file_part and not resolved.exists():
                yield number, f"link `{target}`: {file_part} does not exist"
            elif anchor and (not file_part or resolved.suffix == ".md"):
                if anchor not in headings(resolved.read_text() if file_part else text):
                    yield number, f"link `{target}`: no heading #{anchor} in {resolved.name if file_part else path.name}"


def check_document(path: Path, text: str | None = None) -> list[str]:
    """Every problem of one markdown file as `file:line: what`."""
    text = path.read_text() if text is None else text
    name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    problems = []
    for number, command in commands(text):
        problems += [f"{name}:{number}: {p} (in: {command.strip()})" for p in check_command(command)]
    for number, problem in check_links(path, text):
        problems.append(f"{name}:{number}: {problem}")
    prose, _ = prose_and_blocks(text)
    problems += [f"{name}:{number}: {problem}" for number, problem in check_prose_keys(prose)]
    for number, span in inline_spans(prose):
        if REPO_PATH.match(span) and not (REPO / span).exists():
            problems.append(f"{name}:{number}: `{span}` does not exist in the repository")
    return problems


# ---------------------------------------------------------------- the tests


def test_docs_exist_and_the_readme_stays_short():
    names = {p.name for p in DOCS}
    want = {"README.md", "training.md", "data.md", "parallelism.md", "optimizers.md", "checkpoints.md",
            "benchmarks.md", "development.md"}  # fmt: skip
    assert want <= names
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_readme_links_every_doc():
    readme = (REPO / "README.md").read_text()
    linked = {m.group(1).partition("#")[0] for m in LINK.finditer(readme)}
    assert {f"docs/{p.name}" for p in DOCS[1:]} <= linked


def test_every_command_key_link_and_path_in_the_docs_exists():
    problems = [p for path in DOCS for p in check_document(path)]
    assert not problems, "\n".join(problems)


def test_the_docs_commands_are_found():
    """A positive control on the real docs: the checks above see the commands they claim to."""
    found = [entry_point(shlex.split(c, comments=True)) for path in DOCS for _, c in commands(path.read_text())]
    targets = {entry[0] for entry in found if entry is not None}
    assert {"snoo_train.train", "snoo_train.data.prepare", "snoo_train.data.train_tokenizer", "snoo_train.export",
            "snoo_train.analysis.plot", "make", "bench/throughput.py"} <= targets  # fmt: skip
    assert None in found  # python -c, docker build: seen and left alone


ROTTEN = """# A made-up doc

```bash
python -m snoo_train.train optim=snoo_adamw optim.not_a_key=1 \\
    model=no_such_model +experiment=k_ablation hydra.run.dir=runs/x
python -m snoo_train.data.prepare data=local prepare.out=x trainer.max_steps=5
python -m snoo_train.no_such_tool x=1
```

Run `python bench/throughput.py --no-such-flag trainer.batch_size=8`, then
`make train ARGS="trainer.max_step=5"` and `python -m snoo_train.export a b --weigths slow`.
See [the data doc](data.md), [nowhere](no_such.md), [a heading](training.md#no-such-heading),
[this one](#a-made-up-doc), [not this](#a-made-up-dog) and `snoo_train/no_such_file.py`.

| `optim=adamw\\|no_such_optim` | `trainer.not_a_key`, `tokenizer.vocab_size`, `tokenizer.vocab` |
|---|---|

`make no_such_target NO_SUCH_VARIABLE=1` and `python bench/overhead.py trainer.batch_size=8`.
"""


def test_rotten_docs_are_caught_with_file_line_and_key():
    problems = check_document(REPO / "docs" / "rotten.md", ROTTEN)
    want = [
        "docs/rotten.md:4: `optim.not_a_key` is not a key of snoo_train.config.Config",
        "docs/rotten.md:4: `model=no_such_model`: no snoo_train/configs/groups/model/no_such_model.yaml",
        "docs/rotten.md:6: `trainer.max_steps` is not a key of snoo_train.config.PrepareJob",
        "docs/rotten.md:7: `snoo_train.no_such_tool` does not exist (snoo_train/no_such_tool/__main__.py)",
        "docs/rotten.md:10: `--no-such-flag` is not an option of bench/throughput.py",
        "docs/rotten.md:11: `trainer.max_step` is not a key of snoo_train.config.Config",
        "docs/rotten.md:11: `--weigths` is not an option of snoo_train.export",
        "docs/rotten.md:18: `make no_such_target`: no such target in the Makefile",
        "docs/rotten.md:18: `NO_SUCH_VARIABLE` is not a variable of the Makefile",
        "docs/rotten.md:18: `trainer.batch_size=8`: bench/overhead.py takes no Hydra overrides",
        "docs/rotten.md:12: link `no_such.md`: no_such.md does not exist",
        "docs/rotten.md:12: link `training.md#no-such-heading`: no heading #no-such-heading in training.md",
        "docs/rotten.md:13: link `#a-made-up-dog`: no heading #a-made-up-dog in rotten.md",
        "docs/rotten.md:15: `optim=no_such_optim`: no snoo_train/configs/groups/optim/no_such_optim.yaml",
        "docs/rotten.md:15: `trainer.not_a_key` is not a key of snoo_train.config.Config",
        "docs/rotten.md:15: `tokenizer.vocab` is not a key of snoo_train.config.TokenizerJob",
        "docs/rotten.md:13: `snoo_train/no_such_file.py` does not exist in the repository",
    ]
    assert [p.split(" (in: ")[0] for p in problems] == want
    assert "(in: python -m snoo_train.train optim=snoo_adamw optim.not_a_key=1" in problems[0]
