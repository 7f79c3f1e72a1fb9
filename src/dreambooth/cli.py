"""`dreambooth` command line: a thin layer over the Python API (train, generate, serve ...).

No flag is written by hand. `dreambooth train` has one flag per key of the typed config
(config.py; the names of diffusers' examples/dreambooth/train_dreambooth.py), plus
`--config FILE` (flat YAML, flags override it) and `--print_config` (print the resolved YAML and
exit). The other commands take their flags from the function each calls (COMMANDS): a parameter
is a flag of the same name, typed by its annotation, with its default (stated only there) and
its help from the function's `Args:` docstring section; a small table per command renames a
flag, gives choices or converts a value.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import re
import sys
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth.config import (
    ALIASES,
    IGNORED_FLAGS,
    UNSUPPORTED_FLAGS,
    ConfigError,
    dump_yaml,
    field_type,
    leaf_fields,
    load_yaml_config,
    optional_type,
    parse_train_config,
)


# ------------------------------------------------------------ config dataclass -> flags
def add_dataclass_flags(parser: argparse.ArgumentParser,
                        config_fields: Iterable[tuple[dataclasses.Field, Any]], *,
                        as_text: bool = False) -> None:
    """One `--name` flag per field made with `config.option`, its help from the field's.

    `config_fields` are (field, value type) pairs, e.g. (resolution, int), (seed, int) for
    `int | None`. Values are parsed to that type (tuples comma-separated: `--channels 32,64`)
    and default to the field's. With `as_text` values stay text and an unset flag stays out of
    the namespace, for `parse_train_config`, which merges them over a YAML file, converts them
    and reports every bad one at once. Booleans are `--name` / `--no-name`.
    """
    for leaf, value_type in config_fields:
        if leaf.default is not dataclasses.MISSING:
            default = leaf.default
        else:
            default = leaf.default_factory()
        help_text = leaf.metadata.get("help", "").replace("%", "%%")
        choices = [choice for choice in leaf.metadata.get("choices") or () if choice is not None]
        flag = f"--{leaf.name}"
        unset = argparse.SUPPRESS if as_text else default
        if value_type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=unset,
                                help=help_text)
        elif as_text:
            parser.add_argument(flag, default=unset, metavar=_metavar(value_type, choices),
                                help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(flag, type=_parse_text(value_type), default=unset,
                                choices=choices or None, metavar=_metavar(value_type, choices),
                                help=f"{help_text} (default: {default})")


def _metavar(value_type: Any, choices: Sequence) -> str:
    if choices:
        return "{" + ",".join(str(choice) for choice in choices) + "}"
    if typing.get_origin(value_type) is tuple:
        return f"{typing.get_args(value_type)[0].__name__.upper()},..."
    return value_type.__name__.upper()


def _parse_text(value_type: Any) -> Callable[[str], Any]:
    if typing.get_origin(value_type) is not tuple:
        return value_type
    item_type = typing.get_args(value_type)[0]

    def comma_separated(text: str) -> tuple:
        return tuple(item_type(part) for part in text.split(","))

    return comma_separated


# ------------------------------------------------------------------ function -> flags
@dataclass(frozen=True)
class Flag:
    """What a parameter's signature cannot tell about its flag (never its default)."""

    name: str | None = None  # the flag's name when it is not the parameter's
    choices: Sequence[str] | None = None
    metavar: str | None = None
    required: bool = False  # required on the command line although the function has a default
    repeat: bool = False  # may be given several times; the values come as a list
    convert: Callable[[Any], Any] | None = None  # parsed value -> argument, applied when calling


@dataclass(frozen=True)
class Command:
    """A subcommand: the function it calls, per-parameter Flags, how to show the result."""

    function: Callable
    help: str
    flags: Mapping[str, Flag] = field(default_factory=dict)  # by parameter name
    options_of: Callable | None = None  # the function `function`'s `**options` are passed to
    show: Callable[[Any], None] = lambda result: None


def docstring_args(function: Callable) -> dict[str, str]:
    """{name: help} from a Google-style `Args:` docstring section: `name: help` lines, with
    continuation lines indented deeper; a blank or less indented line ends the section."""
    lines = (inspect.getdoc(inspect.unwrap(function)) or "").splitlines()
    if "Args:" not in lines:
        return {}
    helps: dict[str, str] = {}
    indent, name = None, None
    for line in lines[lines.index("Args:") + 1:]:
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if not line.strip() or depth < indent or depth == 0:
            break
        entry = re.fullmatch(r"\**(\w+): (.*)", line.strip())
        if depth == indent and entry:
            name, helps[entry[1]] = entry[1], entry[2]
        elif depth > indent and name:
            helps[name] += " " + line.strip()
    return helps


def command_parameters(command: Command) -> list[tuple[inspect.Parameter, Any]]:
    """(parameter, annotation) of every flag of `command`, in signature order; a `**options`
    parameter stands for the keyword-only parameters of `command.options_of`."""
    own = _annotated_parameters(command.function)
    names = {parameter.name for parameter, _ in own}
    result = []
    for parameter, hint in own:
        if parameter.kind is parameter.VAR_KEYWORD and command.options_of is not None:
            result += [(option, option_hint)
                       for option, option_hint in _annotated_parameters(command.options_of)
                       if option.kind is option.KEYWORD_ONLY and option.name not in names]
        elif parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            result.append((parameter, hint))
    return result


def _annotated_parameters(function: Callable) -> list[tuple[inspect.Parameter, Any]]:
    function = inspect.unwrap(function)
    hints = typing.get_type_hints(function)
    return [(parameter, hints.get(name))
            for name, parameter in inspect.signature(function).parameters.items()]


def add_function_flags(parser: argparse.ArgumentParser, command: Command) -> None:
    """One flag per parameter of the command's function (see command_parameters).

    A flag is typed bool, int or float when the annotation allows it (`int | None` -> int),
    else text (paths, mappings: a Flag's `convert` makes the argument); its default is the
    parameter's and it is required when the parameter has none.
    """
    helps = docstring_args(command.options_of) if command.options_of else {}
    helps |= docstring_args(command.function)
    for parameter, hint in command_parameters(command):
        flag = command.flags.get(parameter.name, Flag())
        value_type, _ = optional_type(hint)
        help_text = helps.get(parameter.name, "").replace("%", "%%")
        options: dict[str, Any] = {"dest": flag.name or parameter.name}
        if flag.required or parameter.default is parameter.empty:
            options["required"] = True
        else:
            options["default"] = parameter.default
            if parameter.default not in (None, "") and value_type is not bool:
                help_text += " (default: %(default)s)"
        if value_type is bool:
            false_by_default = options.get("default") is False
            options["action"] = "store_true" if false_by_default else argparse.BooleanOptionalAction
        else:
            options["type"] = value_type if value_type in (int, float) else str
            options["action"] = "append" if flag.repeat else "store"
            options["choices"] = flag.choices
            options["metavar"] = flag.metavar
        parser.add_argument(f"--{flag.name or parameter.name}", help=help_text, **options)


def call(command: Command, args: argparse.Namespace) -> Any:
    """Call the command's function with the parsed flags, converted where a Flag says."""
    arguments = {}
    for parameter, _ in command_parameters(command):
        flag = command.flags.get(parameter.name, Flag())
        value = getattr(args, flag.name or parameter.name)
        arguments[parameter.name] = flag.convert(value) if flag.convert else value
    return command.function(**arguments)


def parse_named_paths(values: list[str], flag: str) -> dict[str, str]:
    """`NAME=PATH` (or a bare PATH, named after its folder) flags as {name: path}."""
    named: dict[str, str] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator:
            path = value
            name = Path(value).name if Path(value).exists() else value
        if not name or not path:
            raise ValueError(f"{flag} '{value}' must be NAME=PATH")
        if name in named:
            raise ValueError(f"{flag} names '{name}' twice; give each a different NAME=")
        named[name] = path
    return named


# ------------------------------------------------------------------------- commands
def _generate() -> Command:
    from dreambooth.generate import SCHEDULERS, generate
    from dreambooth.models import DTYPES

    def show(result) -> None:
        for path in result.paths:
            print(path)
        if result.grid_path:
            print(result.grid_path)

    return Command(generate, "Generate images with a model.", {
        "scheduler": Flag(choices=list(SCHEDULERS)), "dtype": Flag(choices=["auto", *DTYPES]),
        "output_dir": Flag(required=True), "lora": Flag(metavar="FILE"),
    }, show=show)


def _serve() -> Command:
    from dreambooth.models import DTYPES
    from dreambooth.serve.app import API_KEY_ENV, create_app, run_server

    return Command(
        run_server, "Serve models over OpenAI's Images API, OpenRouter and A1111 (HTTP).", {
            "models": Flag(name="model", repeat=True, metavar="NAME=PATH",
                           convert=lambda values: parse_named_paths(values, "--model")),
            "loras": Flag(name="lora", repeat=True, metavar="NAME=PATH",
                          convert=lambda values: parse_named_paths(values or [], "--lora")),
            "api_key": Flag(convert=lambda key: key or os.environ.get(API_KEY_ENV)),
            "dtype": Flag(choices=["auto", *DTYPES]),
            "cors_origins": Flag(name="cors_origin", repeat=True, metavar="ORIGIN",
                                 convert=lambda values: tuple(values) if values else None),
        }, options_of=create_app)


def _export() -> Command:
    from dreambooth.formats.export import FORMATS, export_model
    from dreambooth.formats.single_file import PREDICTION_TYPES
    from dreambooth.models import DTYPES

    return Command(
        export_model,
        "Write a model as diffusers, single-file (A1111/ComfyUI) or LoRA files.", {
            "fmt": Flag(name="format", choices=FORMATS), "dtype": Flag(choices=list(DTYPES)),
            "merge_lora_path": Flag(name="merge_lora", metavar="LORA"),
            "prediction_type": Flag(choices=PREDICTION_TYPES),
        }, show=print)


def _eval() -> Command:
    import json
    from dataclasses import asdict

    from dreambooth.world.dreambench import evaluate_model, read_prompts

    return Command(
        evaluate_model,
        "Score a model against reference photos (subject/prompt fidelity, PRES, DIV).", {
            "prompts": Flag(metavar="FILE",
                            convert=lambda path: read_prompts(path) if path else None),
        }, show=lambda result: print(json.dumps(asdict(result), indent=2)))


def _demo() -> Command:
    from dreambooth.world.demo import run_demo_preset

    return Command(run_demo_preset,
                   "The whole DreamBooth job on the bundled world model (minutes on a CPU).")


# Subcommands but `train`, each loaded (imported) when the parser is built.
COMMANDS: dict[str, Callable[[], Command]] = {
    "generate": _generate, "serve": _serve, "export": _export, "eval": _eval, "demo": _demo,
}


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of config keys; flags override it.")
    parser.add_argument("--print_config", action="store_true",
                        help="Print the resolved configuration as YAML and exit.")
    add_dataclass_flags(parser, [(leaf, field_type(section, leaf)[0])
                                 for section, leaf in leaf_fields()], as_text=True)
    for alias, key in ALIASES.items():  # (all of them booleans so far)
        parser.add_argument(f"--{alias}", action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=f"Alias of --{key}.")
    for name, reason in IGNORED_FLAGS.items():
        parser.add_argument(f"--{name}", nargs="?", const=True, default=argparse.SUPPRESS,
                            help=f"Ignored: {reason}.")
    for name, reason in UNSUPPORTED_FLAGS.items():
        parser.add_argument(f"--{name}", nargs="?", const=True, default=argparse.SUPPRESS,
                            help=f"Refused: {reason}.")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `dreambooth` parser. With `only` (a subcommand's name) the other subcommands are
    left as bare names, so a command starts without importing what the others need."""
    parser = argparse.ArgumentParser(prog="dreambooth", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(commands.add_parser(
        "train", help="Personalize a Stable Diffusion model on a few subject photos."))
    for name, load in COMMANDS.items():
        if only is not None and name != only:
            commands.add_parser(name, help=f"See `dreambooth {name} --help`.")
            continue
        try:
            command = load()
        except ImportError as error:
            # An optional extra is missing (serve): the command still parses, and running it
            # reports the ImportError. '+' prefixes nothing, so every argument is taken as is.
            unavailable = commands.add_parser(name, help=f"Unavailable: {error}",
                                              prefix_chars="+", add_help=False)
            unavailable.add_argument("arguments", nargs="*")
            continue
        add_function_flags(commands.add_parser(name, help=command.help), command)
    return parser


def resolve_train_config(args: argparse.Namespace):
    """YAML file -> command-line overrides -> validated TrainConfig."""
    overrides = {key: value for key, value in vars(args).items()
                 if key not in ("command", "config", "print_config")}
    values = load_yaml_config(args.config) if args.config else {}
    source = f"configuration ({args.config} + command line)" if args.config else "command line"
    return parse_train_config({**values, **overrides}, source=source)


def quiet_libraries() -> None:
    """Keep what the libraries print to what is the user's business: Lightning's hardware
    summary and advertisements, the loading bars of every pretrained part, and deprecation
    notices between libraries go; warnings and errors stay, as does the training bar."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*`torch_dtype` is deprecated.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # The user's problem in one line, without the source line Python would print under it.
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(only=chosen if chosen in ("train", *COMMANDS) else None).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.formatwarning = _one_line_warning
    try:
        if args.command == "train":
            config = resolve_train_config(args)
            if args.print_config:
                print(dump_yaml(config), end="")
                return 0
            quiet_libraries()
            from dreambooth.train.run import train

            output_dir = train(config)
            print(f"trained pipeline: {output_dir}")
        else:
            command = COMMANDS[args.command]()  # an unavailable command raises its ImportError
            quiet_libraries()
            command.show(call(command, args))
    except (ConfigError, ValueError, OSError, ImportError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
