"""The package's layout rules (docs/ARCHITECTURE.md), read from the source and from a fresh interpreter.

- No module of the package imports a program module (`train`, `benchmark`, `compile_check`, `main`,
  `experiments/*`): programs stand side by side on the library modules (`main` picks a program by name through
  `importlib`, which is not an import of it).
- The library folders are layers (docs/ARCHITECTURE.md): each imports only the folders below it (LAYERS).
- The core a GPU or TPU machine runs without TensorFlow (the steps, their builder, the workload, `benchmark`,
  `compile_check`) imports neither TensorFlow, TFDS, ml_collections nor clu, even when it lowers a step.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'meta_pseudo_labels'
PROGRAMS = frozenset({'meta_pseudo_labels.run.train', 'meta_pseudo_labels.benchmark',
                      'meta_pseudo_labels.compile_check', 'meta_pseudo_labels.main', 'meta_pseudo_labels.predict',
                      'meta_pseudo_labels.export'} | {
                          f'meta_pseudo_labels.experiments.{path.stem}'
                          for path in (PACKAGE / 'experiments').glob('*.py') if path.stem != '__init__'})
HEAVY = ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'clu')


def imported_modules(source):
  """Every module an `import` statement anywhere in `source` names (function-level imports included):
  `from a import b` counts as `a.b` (b may be a module) and as `a`."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def module_name(path):
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def test_imported_modules_sees_every_form_of_import():
  source = ('import meta_pseudo_labels.run.train\n'
            'def f():\n  from meta_pseudo_labels import benchmark  # pylint: disable=g-import-not-at-top\n'
            'from meta_pseudo_labels.experiments import two_moons\n')
  assert {'meta_pseudo_labels.run.train', 'meta_pseudo_labels.benchmark',
          'meta_pseudo_labels.experiments.two_moons'} <= imported_modules(source)


def test_the_programs_are_the_known_ones():
  assert {'meta_pseudo_labels.run.train', 'meta_pseudo_labels.experiments.two_moons'} <= PROGRAMS


@pytest.mark.parametrize('path', sorted(PACKAGE.rglob('*.py')), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_program(path):
  imported_programs = (imported_modules(path.read_text()) & PROGRAMS) - {module_name(path)}
  assert not imported_programs, (f'{path.relative_to(REPO)} imports the program module(s) {sorted(imported_programs)}; '
                                 'move what it needs into a library module')


# Library folder -> the folders it may import (besides itself and the shared base `errors`). Folders at the top
# (the command-line programs and their support modules) and experiments/ may import any library folder.
LAYERS = {
    'data': set(),
    'models': set(),
    'method': {'models'},
    'execution': {'models', 'method'},
    'rundir': set(),
    'trained': {'data', 'models', 'method', 'execution', 'rundir'},
    'run': {'data', 'models', 'method', 'execution', 'rundir', 'trained'},
}


def test_every_library_folder_has_a_layer():
  folders = {path.parent.name for path in PACKAGE.glob('*/__init__.py')} - {'experiments'}
  assert folders == set(LAYERS), 'add the new folder to LAYERS and to docs/ARCHITECTURE.md'


@pytest.mark.parametrize('path', sorted(p for folder in LAYERS for p in (PACKAGE / folder).rglob('*.py')),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_folders_import_only_the_layers_below(path):
  folder = path.relative_to(PACKAGE).parts[0]
  allowed = LAYERS[folder] | {folder}
  imported = {name.split('.')[1] for name in imported_modules(path.read_text())
              if name.startswith('meta_pseudo_labels.') and name.count('.') >= 1}
  imported_folders = {name for name in imported if (PACKAGE / name).is_dir()}
  imported_top = imported - imported_folders - {'errors'}
  assert not imported_folders - allowed, (f'{path.relative_to(REPO)} (layer {folder}) imports '
                                          f'{sorted(imported_folders - allowed)}; it may import {sorted(allowed)}')
  assert not imported_top, f'{path.relative_to(REPO)} imports the top-level module(s) {sorted(imported_top)}'


LOWER_AND_LIST_MODULES = '''
import json, sys
import jax
heavy = lambda: sorted(m for m in sys.modules if m.split('.')[0] in %r)
from meta_pseudo_labels import benchmark  # noqa: F401
from meta_pseudo_labels import compile_check
from meta_pseudo_labels.execution import step_builder
from meta_pseudo_labels.execution import workload
after_import = heavy()
from configs import two_moons   # an ml_collections ConfigDict
config = two_moons.get_config()
config.experiment = 'train'
lowered, info = compile_check.lower_mpl_step(config, jax.devices()[:1])
memory = compile_check.memory_report(lowered.compile(), 2**30)
print(json.dumps({'after_import': after_import, 'after_lowering': [m for m in heavy() if 'ml_collections' not in m],
                  'fits': memory['fits']}))
''' % (HEAVY,)


def test_core_and_compile_check_import_no_tensorflow_even_when_lowering():
  completed = subprocess.run([sys.executable, '-c', LOWER_AND_LIST_MODULES], cwd=REPO, capture_output=True,
                             text=True, timeout=240, check=False,
                             env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(REPO)})
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result == {'after_import': [], 'after_lowering': [], 'fits': True}
