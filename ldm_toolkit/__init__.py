"""The entry points, above every other package: the ``ldm`` command (``ldm_toolkit.cli``) and the trainers'
entry (``ldm_toolkit.train``, also ``accelerate launch -m ldm_toolkit.train CONFIG``). Nothing imports them."""
