from .shapes import CLASSES, PALETTE, SEG_CLASSES, SEG_PALETTE, generate

__all__ = ['CLASSES', 'PALETTE', 'SEG_CLASSES', 'SEG_PALETTE', 'generate']
