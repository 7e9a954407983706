"""Detection and instance segmentation (Mask R-CNN) and semantic segmentation (UperNet) on MambaOut backbones."""
