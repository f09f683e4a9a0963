"""The one table of a run's phases and networks: every other module derives its names from it.

A phase is a stretch of training with its own state and checkpoint directory (`checkpoints/<phase>`, train.py); a
network is what evaluation reports (results.json, TensorBoard `validation/<network>/...`), what `predict --model`,
`export --model` and a warm start's 'W:<network>' name, and where its parameters and BatchNorm statistics sit in its
phase's state. Renaming a state field or a network here renames it everywhere (evaluation, trained_models, warm
starts, the experiments), instead of silently breaking export and warm starts.

- method 'mpl': phase 'mpl' trains the teacher, the student and its EMA (Pham et al. Sec. 2-3; App. C: the EMA
  student is the one reported), then phase 'finetune' finetunes the EMA student on labeled data (Sec. 3.2).
- methods 'supervised' / 'uda': one phase named after the method trains one network and its EMA.
"""

import dataclasses

from meta_pseudo_labels.rundir import sweeps

MPL, FINETUNE = 'mpl', 'finetune'
SINGLE_NETWORK_METHODS = ('supervised', 'uda')
# Every phase; the position is the phase's index in the run's random streams (train.py folds it into the seed):
# append only, never reorder.
PHASES = (MPL, *SINGLE_NETWORK_METHODS, FINETUNE)


@dataclasses.dataclass(frozen=True)
class Network:
  name: str
  phase: str | None          # the phase that trains it; None: the run's method ('supervised' | 'uda')
  state_path: tuple          # attributes / keys from the phase's state to the network (its variables or a TrainState)
  architecture: str          # the config field of its architecture: 'model' (the teacher's) | 'student_model'

  def phase_of(self, method):
    return self.phase or method

  def variables(self, state):
    """`{'params', 'batch_stats'}` of this network in a live state of its phase."""
    for key in self.state_path:
      state = getattr(state, key)
    return getattr(state, 'variables', state)   # a TrainState, or an EMA's variables themselves


TEACHER = Network('teacher', MPL, ('teacher',), 'model')
STUDENT = Network('student', MPL, ('student',), 'student_model')
STUDENT_EMA = Network('student_ema', MPL, ('student_ema',), 'student_model')
STUDENT_FINETUNED = Network('student_finetuned', FINETUNE, ('network',), 'student_model')
MODEL = Network('model', None, ('network',), 'model')
MODEL_EMA = Network('model_ema', None, ('ema',), 'model')

NETWORKS = {network.name: network for network in
            (TEACHER, STUDENT, STUDENT_EMA, STUDENT_FINETUNED, MODEL, MODEL_EMA)}
# A phase named instead of a network stands for the phase's final network: the one MPL reports (App. C: the EMA
# student) and finetunes, the finetuned student, the supervised / UDA network itself.
PHASE_FINAL_NETWORK = {MPL: STUDENT_EMA, FINETUNE: STUDENT_FINETUNED, **{m: MODEL for m in SINGLE_NETWORK_METHODS}}


def of_phase(phase, reduced_teacher=False):
  """The networks phase `phase` trains and evaluates, in evaluation order. `reduced_teacher`: Reduced MPL's teacher
  T_R (App. E) reads stored targets, not images: it is no network to evaluate or load by name."""
  if phase in SINGLE_NETWORK_METHODS:
    return [MODEL, MODEL_EMA]
  return [network for network in NETWORKS.values()
          if network.phase == phase and not (reduced_teacher and network is TEACHER)]


def of_run(method, finetune_steps, reduced_teacher=False):
  """The networks a run trains, in evaluation order."""
  if method == MPL:
    return of_phase(MPL, reduced_teacher) + (of_phase(FINETUNE) if finetune_steps else [])
  return of_phase(method)


def final(method, finetune_steps):
  """The run's final network (what a workdir 'W' alone names): its last phase's final network."""
  return PHASE_FINAL_NETWORK[FINETUNE if method == MPL and finetune_steps else method]


def sweep_row(description, method, fields=()):
  """A sweep's row (rundir/sweeps.py's `Row`) of `method` with the networks it reads, fixed before any result: the
  one its table reports (MPL's finetuned student, the network the paper reports; else the EMA network) and the one
  whose validation curve its figure draws (evaluated during the main phase)."""
  if method == MPL:
    reported, curve = STUDENT_FINETUNED.name, STUDENT_EMA.name
  else:
    reported = curve = MODEL_EMA.name
  return sweeps.Row(description, method, fields, reported_model=reported, curve_model=curve)


def parse_reference(reference):
  """'W' | 'W:<network or phase>' | an exported directory -> (directory, network name or None): how a warm start,
  `predict --model` and `export --model` name a network of this table.

  The suffix counts only if it names a network or phase, so paths with colons (gs://...) stay whole.
  """
  directory, _, suffix = reference.rpartition(':')
  if directory and suffix in PHASE_FINAL_NETWORK:
    return directory, PHASE_FINAL_NETWORK[suffix].name
  if directory and suffix in NETWORKS:
    return directory, suffix
  return reference, None
