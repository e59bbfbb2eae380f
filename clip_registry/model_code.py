"""The "models from code" script MLflow stores with the logged model and runs when loading it.

It only builds an empty :class:`clip_registry.pyfunc.ClipPyfuncModel`; the weights come from
the model's ``checkpoint`` artifact in ``load_context``. Loading therefore needs clipops
installed, and nothing is unpickled.
"""

from mlflow.models import set_model

from clip_registry.pyfunc import ClipPyfuncModel

set_model(ClipPyfuncModel())
