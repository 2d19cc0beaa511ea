"""Each script's flags: the seed's commands parse, `--help` lists only what the script reads (plus
one labelled group of the reference's no-op flags), on/off spellings, one-line range errors, the
warning for a reference flag set to a value that would matter in the reference, and the one way
library errors name flags (a field's flag first, in `args.error_text`)."""
import ast
import contextlib
import io
import os
import re

import pytest
from torch.utils.data import DataLoader, Dataset

import main
import main_deploy
from args import REFERENCE_GROUP, error_text, reference_warnings, script_entry, script_flags
from utils import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ["datasets.py", "losses.py", "pruning", "utils", "engine", "models"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")

# the seed's commands (README and scripts/prune.sh, scripts/finetune.sh), paths replaced
SEED_PRUNE = ["--finetune=/ckpt/deit_base.pth", "--batch-size=32", "--num_workers=16", "--data-path=/imagenet",
              "--model=deit_base_patch16_224", "--pruning_per_iteration=100", "--pruning_feed_percent=0.1",
              "--pruning_method=2", "--pruning_layers=3", "--pruning_flops_percentage=0.50",
              "--pruning_flops_threshold=0.0001", "--need_hessian", "--finetune_op=2", "--epochs=1",
              "--output_dir=/out"]
SEED_FINETUNE = ["--dist-eval", "--resume=", "--masked_model=/out/checkpoint_pruned_00.pth",
                 "--teacher-path=/ckpt/regnety_160.pth", "--batch-size=128", "--num_workers=16",
                 "--data-path=/imagenet", "--model=deit_base_patch16_224_deploy", "--pruning_flops_percentage=0",
                 "--finetune_op=1", "--epochs=300", "--warmup-epochs=0", "--cooldown-epochs=0", "--output_dir=/ft"]
FINETUNE_SH = ["--auto_resume", "--teacher-model=regnety_160", "--distillation-type=hard"]

# flags read by only one of the scripts
PRUNE_ONLY = {"--pruning_method", "--pruning_layers", "--pruning_feed_percent", "--pruning_flops_threshold",
              "--need_hessian", "--hessian_embed", "--pruning_micro_batch", "--pruning_pickle_from",
              "--pruning_normalize_by_layer", "--pruning_normalize_type", "--pruning_protect", "--pruning_silent",
              "--mask_aware_norm"}
DEPLOY_ONLY = {"--model-ema", "--model-ema-decay", "--model-ema-force-cpu", "--model-ema-eval", "--opt", "--opt-eps",
               "--opt-betas",
               "--clip-grad", "--momentum", "--weight-decay", "--sched", "--lr", "--warmup-lr", "--min-lr",
               "--warmup-epochs", "--cooldown-epochs", "--start_epoch", "--repeated-aug", "--teacher-model",
               "--teacher-path", "--distillation-type", "--distillation-alpha", "--distillation-tau", "--save_freq",
               "--masked_model", "--throughput", "--auto_resume"}
REFERENCE = {main: {"--pruning_per_iteration", "--maximum_pruning_iterations", "--pruning_momentum", "--finetune_op",
                    "--epochs", "--world_size"},
             main_deploy: {"--pruning_flops_percentage", "--finetune_op", "--resplit", "--world_size"}}


def help_groups(module) -> dict:
    """group title -> the flags `--help` lists under it (first spelling of each line)."""
    groups, title = {}, None
    for line in module.get_args_parser().format_help().splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            groups[title] = set()
        elif line.startswith("  --") and title is not None:
            groups[title].add(re.match(r"\s+(--[\w-]+)", line).group(1))
    return groups


def parse_error(module, argv) -> str:
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(err):
        module.get_args_parser().parse_args(argv)
    assert exit_.value.code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    return lines[0]


def test_seed_commands_parse():
    ns = main.get_args_parser().parse_args(SEED_PRUNE)
    assert (ns.pruning_flops_percentage, ns.need_hessian, ns.batch_size, ns.epochs) == (0.5, True, 32, 1)
    assert reference_warnings(ns, main.REFERENCE_FLAGS) == []
    ns = main_deploy.get_args_parser().parse_args(SEED_FINETUNE + FINETUNE_SH)
    assert (ns.masked_model, ns.epochs, ns.resume, ns.distillation_type) == ("/out/checkpoint_pruned_00.pth", 300,
                                                                             "", "hard")
    assert reference_warnings(ns, main_deploy.REFERENCE_FLAGS) == []


@pytest.mark.parametrize("module, other_only", [(main, DEPLOY_ONLY), (main_deploy, PRUNE_ONLY)])
def test_help_lists_only_the_scripts_flags_and_one_reference_group(module, other_only):
    groups = help_groups(module)
    assert groups[REFERENCE_GROUP] == REFERENCE[module]
    listed = set().union(*groups.values())
    assert not listed & other_only, listed & other_only
    for title, flags in groups.items():  # a reference flag appears in its group only
        if title != REFERENCE_GROUP:
            assert not flags & REFERENCE[module], (title, flags & REFERENCE[module])
    help_text = module.get_args_parser().format_help()
    assert "--distillation" not in help_text if module is main else "--pruning_method" not in help_text


def test_on_off_spellings():
    parse = main_deploy.get_args_parser().parse_args
    off = parse(["--no-model-ema", "--no-repeated-aug", "--no-pin-mem", "--no-amp"])
    assert not (off.model_ema or off.repeated_aug or off.pin_mem or off.amp)
    on = parse(["--model-ema", "--repeated-aug", "--pin-mem", "--amp"])
    assert on.model_ema and on.repeated_aug and on.pin_mem and on.amp
    assert parse([]).model_ema and parse([]).amp
    parse = main.get_args_parser().parse_args
    assert parse([]).pruning_protect and parse(["--pruning_protect"]).pruning_protect
    assert not parse(["--no-pruning_protect"]).pruning_protect
    assert not parse(["--no_pruning_protect"]).pruning_protect
    assert not parse(["--no-pin-mem", "--no-amp"]).amp


@pytest.mark.parametrize("module, argv, words", [
    (main, ["--pruning_flops_percentage", "1"], ["--pruning_flops_percentage", "(0, 1)", "got 1"]),
    (main, ["--pruning_feed_percent", "0"], ["--pruning_feed_percent", "(0, 1]"]),
    (main, ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (main, ["--batch-size", "x"], ["--batch-size", "integer", "'x'"]),
    (main_deploy, ["--lr", "nan"], ["--lr", "> 0"]),
    (main_deploy, ["--model-ema-decay", "1"], ["--model-ema-decay", "(0, 1)"]),
    (main_deploy, ["--seed", "-1"], ["--seed", "[0, 2**32)"]),
    (main_deploy, ["--opt-betas", "0.9"], ["--opt-betas", "2"]),
])
def test_range_errors_are_one_line_naming_flag_and_range(module, argv, words):
    line = parse_error(module, argv)
    assert all(w in line for w in words), line


def test_flags_of_the_other_script_are_refused():
    assert "--lr" in parse_error(main, ["--lr", "0.1"])
    assert "--pruning_method" in parse_error(main_deploy, ["--pruning_method", "2"])


@pytest.mark.parametrize("module, argv, flag", [
    (main_deploy, ["--pruning_flops_percentage", "0.3"], "--pruning_flops_percentage"),
    (main, ["--maximum_pruning_iterations", "5"], "--maximum_pruning_iterations"),
    (main, ["--finetune_op", "1"], "--finetune_op"),
    (main_deploy, ["--resplit"], "--resplit"),
])
def test_reference_flag_with_an_effective_value_warns_once(module, argv, flag):
    lines = reference_warnings(module.get_args_parser().parse_args(argv), module.REFERENCE_FLAGS)
    assert len(lines) == 1 and lines[0].startswith(flag) and "no effect" in lines[0]


@pytest.mark.e2e  # a subprocess or ONNX export: seconds, not milliseconds
def test_warning_is_logged(tmp_path, capsys):
    """main.py --eval with --maximum_pruning_iterations 5: the run logs one warning line."""
    argv = ["--model", "deit_test_patch8_32", "--data-set", "DIGITS", "--input-size", "32", "--batch-size", "16",
            "--num_workers", "0", "--device", "cpu", "--eval", "--output_dir", str(tmp_path / "o"),
            "--maximum_pruning_iterations", "5"]
    main.main(main.get_args_parser().parse_args(argv))
    warned = [line for line in capsys.readouterr().out.splitlines() if "warning: --maximum_pruning_iterations 5" in line]
    assert len(warned) == 1, warned


# ---------------------------------------------------------------------------
# Library errors name fields; args.error_text puts the field's flag first
# ---------------------------------------------------------------------------

def _python_files(names):
    for name in names:
        path = os.path.join(REPO, name)
        if os.path.isfile(path):
            yield path
        for folder, _, files in os.walk(path):
            yield from (os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))


def _names_in(paths) -> tuple:
    """({field: a file naming it}, {flag: a file spelling it}): fields as `field=` and
    `UserError.about(...)` constants, `UserError(message, "field")` and defaults of `field`
    parameters; flags as `--flag` in strings (not docstrings) of a module without a command line of its own."""
    fields, flags = {}, {}
    for path in paths:
        with open(path) as f:
            text = f.read()
        tree = ast.parse(text)
        own_parser = "Parser(" in text  # e.g. pruning/flops.py: its messages spell its own flags
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        named = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for flag in [] if own_parser else FLAG.findall(node.value):
                    flags.setdefault(flag, os.path.relpath(path, REPO))
            elif isinstance(node, ast.keyword) and node.arg == "field":
                named.append(node.value)
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "about" and node.args:
                named.append(node.args[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "UserError" and len(node.args) > 1:
                named.append(node.args[1])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = node.args.args[len(node.args.args) - len(node.args.defaults):]
                named += [d for a, d in zip(params, node.args.defaults) if a.arg == "field"]
        for item in named:
            if isinstance(item, ast.Constant) and isinstance(item.value, str):
                fields.setdefault(item.value, os.path.relpath(path, REPO))
    return fields, flags


def _script_flags() -> set:
    return {s for module in (main, main_deploy) for a in module.get_args_parser()._actions for s in a.option_strings}


def test_every_field_and_flag_the_library_names_is_a_flag_of_a_script():
    library, spelled = _names_in(_python_files(LIBRARY))
    scripts, _ = _names_in(_python_files(["main.py", "main_deploy.py"]))
    assert {"data_path", "pruning_method", "resume", "teacher_path"} <= set(library)  # the scan works
    assert {"masked_model", "finetune", "model"} <= set(scripts)
    assert len(library) >= 20 and {"--trust_checkpoint", "--data-set", "--teacher-model"} <= set(spelled)
    flags = _script_flags()
    for field, where in {**scripts, **library}.items():
        assert script_flags().get(field) in flags, f"{where} names the field {field!r}, which is no flag of a script"
    for flag, where in spelled.items():
        assert flag in flags, f"{where} spells {flag}, which is no flag of main.py or main_deploy.py"


def test_fields_map_to_the_flags_as_spelled():
    flag = script_flags().get
    assert flag("data_path") == "--data-path" and flag("masked_model") == "--masked_model"
    assert flag("local_rank") == "--local-rank" and flag("pin_mem") == "--pin-mem"
    assert flag("no_such_field") is None
    # every flag of either script has its field, with its first spelling
    for module in (main, main_deploy):
        for action in module.get_args_parser()._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            if action.dest != "help" and action.container.title != REFERENCE_GROUP and action.help != "==SUPPRESS==":
                assert script_flags()[action.dest] in longs, action.dest


def test_error_text_puts_the_flag_of_the_field_first():
    err = UserError("folder '/x' not found (--data-set IMNET expects train/ and val/)", field="data_path")
    assert str(err) == "folder '/x' not found (--data-set IMNET expects train/ and val/)"
    assert error_text(err) == "--data-path: folder '/x' not found (--data-set IMNET expects train/ and val/)"
    assert error_text(UserError("no field: see --trust_checkpoint")) == "no field: see --trust_checkpoint"


def test_about_adds_a_field_only_to_an_error_without_one():
    with pytest.raises(UserError) as err, UserError.about("masked_model"):
        raise UserError("checkpoint 'c.pth' does not fit the model")
    assert err.value.field == "masked_model"
    assert error_text(err.value) == "--masked_model: checkpoint 'c.pth' does not fit the model"
    with pytest.raises(UserError) as err, UserError.about("masked_model"):
        raise UserError("weights file not found: 'w.pth'", field="finetune")
    assert error_text(err.value) == "--finetune: weights file not found: 'w.pth'"


def test_script_entry_prints_the_flag_line(capsys):
    @script_entry
    def failing():
        raise UserError("'m.json' is a mask JSON: pass the weights to slice with --finetune", field="masked_model")

    with pytest.raises(SystemExit) as exit_:
        failing()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: --masked_model: 'm.json' is a mask JSON: pass the weights to slice "
                                       "with --finetune\n")


class _UnreadableImages(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise UserError(f"cannot read image 'img{index}.png'", field="data_path")


def test_the_field_survives_a_dataloader_worker(quick_worker_exit):
    """A worker's error reaches the main process re-created from its traceback text: message and field come back."""
    with pytest.raises(UserError) as err:
        next(iter(DataLoader(_UnreadableImages(), num_workers=1)))
    assert str(err.value) == "cannot read image 'img0.png'" and err.value.field == "data_path"
    assert error_text(err.value) == "--data-path: cannot read image 'img0.png'"
