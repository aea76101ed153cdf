"""bids_adhd: diffusion-MRI BIDS App — DIPY preprocessing and DTI maps, and ADHD
classification with a CT-pretrained 3D CNN adapted by 3D LoRA."""

__version__ = "0.1.0"
