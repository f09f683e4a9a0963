r"""Exports a trained network as a standalone model: `python -m meta_pseudo_labels.export --workdir=W
--output=DIR [--model=NAME]`.

DIR/model.jax_exported is the network's inference function serialized with `jax.export` (StableHLO, with the
parameters, the BatchNorm statistics and the input normalisation baked in, the batch dimension symbolic), so it
runs with jax and numpy alone, without this package or TensorFlow:

    from jax import export
    exported = export.deserialize(open('DIR/model.jax_exported', 'rb').read())
    logits = exported.call(pixels)   # float32 [N, *inputs.input_shape]: 0..255 images after the eval crop

Its input is what `augment.eval_view` yields (the image fitted to `inputs.stored_size` and, for kind 'imagenet', the
87.5% central crop to `inputs.image_size`) before normalisation; vectors as they are. DIR/metadata.json holds that
input spec, the class names, the architecture and where the network came from; DIR/variables.npz the parameters
and statistics again (for `config.teacher_init=DIR`, or another framework). `--platforms` lists the platforms the
program is lowered for (default cpu, cuda and tpu: one file for any of them).
"""

from absl import app
from absl import flags
from absl import logging
import jax
from jax import export as jax_export
import jax.numpy as jnp

from meta_pseudo_labels import cli
from meta_pseudo_labels.trained import networks
from meta_pseudo_labels.trained import trained_models

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, "The training run's directory.")
flags.DEFINE_string('model', None, f'The network: one of {list(networks.NETWORKS)} that the run trained; '
                    'default: its final network.')
flags.DEFINE_string('output', None, 'The directory to write the exported model to.')
flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'], 'Platforms to lower the program for.')


def inference_function(network):
  """pixels (or vectors) -> logits, with the variables and the input normalisation as constants."""
  module = network.module()
  variables = jax.tree.map(jnp.asarray, network.variables)
  spec = network.inputs

  def logits(inputs):
    if spec.mean is not None:
      inputs = (inputs - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)
    return module.apply(variables, inputs, train=False)
  return logits


def export_network(network, platforms):
  """The serialized `jax.export` program of `network`, for any batch size."""
  batch, = jax_export.symbolic_shape('batch')
  inputs = jax.ShapeDtypeStruct((batch, *network.inputs.input_shape), jnp.float32)
  return jax_export.export(jax.jit(inference_function(network)), platforms=platforms)(inputs).serialize()


def run():
  network = trained_models.restore(FLAGS.workdir, FLAGS.model)
  logging.info('exporting %s (%s) from %s for %s', network.name, network.architecture, network.source,
               FLAGS.platforms)
  program = export_network(network, FLAGS.platforms)
  trained_models.write_artifact(FLAGS.output, network, program, {'platforms': FLAGS.platforms,
                                                                 'jax_version': jax.__version__})
  print(f'{network.name} exported to {FLAGS.output}', flush=True)


if __name__ == '__main__':
  app.run(cli.absl_main(run, required_flags=('workdir', 'output')))
