"""Vision-LSTM (ViL) on the fused mLSTM operator ``vil_kernels.mlstm``.

    import vil
    model = vil.create_model("vil2-tiny", img_size=448)          # or checkpoint="vil2_tiny16_e800_in1k.th"
    logits = model(images)                                        # (B, 1000)
"""

from .hub import (MODEL_CONFIGS, MODEL_URLS, convert_training_state_dict, create_model,
                  list_models, load_checkpoint)
from .model import VisionLSTM

__all__ = ["VisionLSTM", "create_model", "list_models", "load_checkpoint",
           "convert_training_state_dict", "MODEL_CONFIGS", "MODEL_URLS"]
