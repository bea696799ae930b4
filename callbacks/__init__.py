"""Lightning callbacks of the project: ``POMTCallback`` selects R on the target device and
prunes the model's ViT before validate/test/predict; ``pomt.callbacks.logs`` sends what it
found to any Lightning logger (through ``pomt.lightning.loggers``)."""

if __name__ != "pomt.callbacks":  # one name, so one module object, for each file of this folder
    raise ImportError(
        f"this folder is pomt.callbacks (it installs under that name): import pomt.callbacks, not {__name__}"
    )


from pomt.callbacks.pomt_callback import POMTCallback

__all__ = ["POMTCallback"]
