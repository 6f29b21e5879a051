from .shapes import CLASSES, PALETTE, SEG_CLASSES, SEG_PALETTE, generate, is_generated

__all__ = ['CLASSES', 'PALETTE', 'SEG_CLASSES', 'SEG_PALETTE', 'generate', 'is_generated']
