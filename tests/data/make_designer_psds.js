// Makes the designer-style PSD fixtures of tests/test_psd_interop.py with ag-psd (a third-party
// PSD writer, so the files are not layerctl's or psd-tools' own):
//
//   npm install ag-psd@31.0.2 && node tests/data/make_designer_psds.js tests/data
//
// designer.psd (48x32, 8-bit RGB), bottom -> top:
//   "Фон"            pixel: opaque, colour = (8*x, 8*y, 100)
//   "Заголовок ✨"   type ("Hi"), stored pixels: red 16x8 at (4,4), alpha 200
//   "Rectangle 1"    shape: a vector rectangle x 24..40, y 4..20, solid blue fill, no stored pixels
//   "Color Fill 1"   solid colour fill (green) under a user mask showing only x 0..12, y 20..32
//   "Gradient Fill 1" linear gradient fill (black -> white, left -> right), mask x 36..48, y 24..32
//   "Группа" group:
//       "Logo"       smart object (embedded PNG), stored pixels: yellow 8x8 at (40, 0)
//       "Invert 1"   invert adjustment clipped to "Logo"
//   "Curves 1"       curves adjustment, not clipped, hidden = false
//   "Frame"          artboard 48x32 holding "Inside" (pixel, white 4x4 at (0, 28))
// nothing.psd (16x16): only a curves adjustment and an empty group.
// The files are small (a few KB); nothing here needs a canvas implementation.
'use strict';
const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const { writePsdBuffer } = require('ag-psd');

const out = process.argv[2] || '.';

function pixels(w, h, fn) {
  const data = new Uint8ClampedArray(w * h * 4);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) data.set(fn(x, y), (y * w + x) * 4);
  return { width: w, height: h, data };
}

function png(w, h, rgba) {  // a tiny real PNG for the smart object's embedded file
  const chunk = (type, body) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(body.length);
    const tb = Buffer.concat([Buffer.from(type, 'ascii'), body]);
    const crc = Buffer.alloc(4); crc.writeUInt32BE(zlib.crc32(tb) >>> 0);
    return Buffer.concat([len, tb, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4); ihdr[8] = 8; ihdr[9] = 6;
  const rows = [];
  for (let y = 0; y < h; y++) { rows.push(Buffer.from([0])); rows.push(Buffer.from(rgba.slice(y * w * 4, (y + 1) * w * 4))); }
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr),
    chunk('IDAT', zlib.deflateSync(Buffer.concat(rows))), chunk('IEND', Buffer.alloc(0))]);
}

const W = 48, H = 32;
const yellow = pixels(8, 8, () => [255, 220, 0, 255]);
const curves = { type: 'curves', rgb: [{ input: 0, output: 30 }, { input: 255, output: 225 }] };

const designer = {
  width: W, height: H,
  imageData: pixels(W, H, (x, y) => [8 * x, 8 * y, 100, 255]),
  linkedFiles: [{ id: '5a6b7c8d-0000-4000-8000-000000000001', name: 'logo.png', data: png(8, 8, yellow.data) }],
  children: [
    { name: 'Фон', left: 0, top: 0, imageData: pixels(W, H, (x, y) => [8 * x, 8 * y, 100, 255]) },
    {
      name: 'Заголовок ✨', left: 4, top: 4, imageData: pixels(16, 8, () => [230, 20, 20, 200]),
      text: { text: 'Hi', transform: [1, 0, 0, 1, 4, 11], style: { font: { name: 'ArialMT' }, fontSize: 8, fillColor: { r: 230, g: 20, b: 20 } } },
    },
    {
      name: 'Rectangle 1',
      vectorFill: { type: 'color', color: { r: 0, g: 0, b: 255 } },
      vectorMask: { paths: [{ open: false, operation: 'combine', fillRule: 'non-zero', knots: [
        { linked: false, points: [24, 4, 24, 4, 24, 4] }, { linked: false, points: [40, 4, 40, 4, 40, 4] },
        { linked: false, points: [40, 20, 40, 20, 40, 20] }, { linked: false, points: [24, 20, 24, 20, 24, 20] }] }] },
    },
    {
      name: 'Color Fill 1', vectorFill: { type: 'color', color: { r: 0, g: 200, b: 0 } },
      mask: { left: 0, top: 0, right: W, bottom: H, defaultColor: 0,
        imageData: pixels(W, H, (x, y) => (x < 12 && y >= 20 ? [255, 255, 255, 255] : [0, 0, 0, 255])) },
    },
    {
      name: 'Gradient Fill 1',
      vectorFill: { type: 'solid', name: 'bw', style: 'linear', angle: 0,
        colorStops: [{ color: { r: 0, g: 0, b: 0 }, location: 0, midpoint: 0.5 }, { color: { r: 255, g: 255, b: 255 }, location: 1, midpoint: 0.5 }],
        opacityStops: [{ opacity: 1, location: 0, midpoint: 0.5 }, { opacity: 1, location: 1, midpoint: 0.5 }] },
      mask: { left: 0, top: 0, right: W, bottom: H, defaultColor: 0,
        imageData: pixels(W, H, (x, y) => (x >= 36 && y >= 24 ? [255, 255, 255, 255] : [0, 0, 0, 255])) },
    },
    {
      name: 'Группа', opened: true, children: [
        {
          name: 'Logo', left: 40, top: 0, imageData: yellow,
          placedLayer: { id: '5a6b7c8d-0000-4000-8000-000000000001', type: 'raster', transform: [40, 0, 48, 0, 48, 8, 40, 8], width: 8, height: 8 },
        },
        { name: 'Invert 1', clipping: true, adjustment: { type: 'invert' } },
      ],
    },
    { name: 'Curves 1', adjustment: curves },
    {
      name: 'Frame', opened: true,
      artboard: { rect: { top: 0, left: 0, bottom: H, right: W }, presetName: 'Custom', color: { r: 255, g: 255, b: 255 }, backgroundType: 1 },
      children: [{ name: 'Inside', left: 0, top: 28, imageData: pixels(4, 4, () => [255, 255, 255, 255]) }],
    },
  ],
};

const nothing = {
  width: 16, height: 16,
  imageData: pixels(16, 16, () => [255, 255, 255, 255]),
  children: [
    { name: 'Curves 1', adjustment: curves },
    { name: 'Empty group', opened: true, children: [] },
  ],
};

for (const [name, doc] of [['designer.psd', designer], ['nothing.psd', nothing]]) {
  const buf = writePsdBuffer(doc, { generateThumbnail: false, noBackground: false });
  fs.writeFileSync(path.join(out, name), buf);
  console.log(name, buf.length, 'bytes');
}
