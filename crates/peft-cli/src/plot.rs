//! The loss curve `peft train` writes beside the adapter: training loss per step (blue) and
//! evaluation loss (orange), as a PNG. Drawn here on a small RGB canvas with a built-in 5x7
//! font, so no font files or plotting stack are needed.

use std::path::Path;

use peft_core::adapter_file::write_atomic;
use peft_train::trainer::MetricsLine;

use crate::cli::CliError;

const WIDTH: usize = 720;
const HEIGHT: usize = 440;
const LEFT: usize = 84;
const RIGHT: usize = 24;
const TOP: usize = 40;
const BOTTOM: usize = 56;
const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
const EVAL_COLOR: [u8; 3] = [255, 127, 14];
const INK: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [225, 225, 225];

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            pixels: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: [u8; 3], thick: bool) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (
                (x0 + (x1 - x0) * t).round() as i64,
                (y0 + (y1 - y0) * t).round() as i64,
            );
            self.set(x, y, color);
            if thick {
                self.set(x + 1, y, color);
                self.set(x, y + 1, color);
            }
        }
    }

    fn dot(&mut self, (x, y): (f64, f64), color: [u8; 3]) {
        for dy in -3..=3i64 {
            for dx in -3..=3i64 {
                if dx * dx + dy * dy <= 9 {
                    self.set(x.round() as i64 + dx, y.round() as i64 + dy, color);
                }
            }
        }
    }

    /// Text at (x, y) (top left), 2x-scaled 5x7 glyphs.
    fn text(&mut self, x: usize, y: usize, text: &str, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        for (sx, sy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            self.set(
                                (x + i * 12 + col * 2 + sx) as i64,
                                (y + r * 2 + sy) as i64,
                                color,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn text_width(text: &str) -> usize {
    text.chars().count() * 12
}

/// 5x7 glyphs, one row per byte, the leftmost pixel in bit 4; unknown characters are blank.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        _ => [0; 7],
    }
}

/// A number short enough for an axis label.
fn label(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude != 0.0 && !(0.01..10_000.0).contains(&magnitude) {
        format!("{value:.1e}")
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// The loss curve of `metrics` as PNG bytes.
pub fn loss_curve_png(metrics: &[MetricsLine]) -> Vec<u8> {
    let train: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricsLine::Train(t) if t.loss.is_finite() => Some((t.step as f64, t.loss)),
            _ => None,
        })
        .collect();
    let eval: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| match m {
            MetricsLine::Eval(e) if e.loss.is_finite() => Some((e.step as f64, e.loss)),
            _ => None,
        })
        .collect();
    let points = || train.iter().chain(&eval);
    let max_step = points().map(|p| p.0).fold(1.0f64, f64::max);
    let (mut low, mut high) = points().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    if low > high {
        (low, high) = (0.0, 1.0);
    }
    if high - low < 1e-9 {
        (low, high) = (low - 0.5, high + 0.5);
    }
    let pad = (high - low) * 0.05;
    let (low, high) = (low - pad, high + pad);
    let (plot_w, plot_h) = (
        (WIDTH - LEFT - RIGHT) as f64,
        (HEIGHT - TOP - BOTTOM) as f64,
    );
    let to_px = |(step, loss): (f64, f64)| {
        (
            LEFT as f64 + step / max_step * plot_w,
            TOP as f64 + (high - loss) / (high - low) * plot_h,
        )
    };

    let mut canvas = Canvas::new();
    let (x0, x1) = (LEFT as f64, (WIDTH - RIGHT) as f64);
    let (y0, y1) = (TOP as f64, (HEIGHT - BOTTOM) as f64);
    for i in 0..=4 {
        let value = low + (high - low) * i as f64 / 4.0;
        let y = to_px((0.0, value)).1;
        canvas.line((x0, y), (x1, y), GRID, false);
        let text = label(value);
        canvas.text(LEFT - 8 - text_width(&text), y as usize - 7, &text, INK);
    }
    for i in 0..=4 {
        let step = (max_step * i as f64 / 4.0).round();
        let x = to_px((step, low)).0;
        canvas.line((x, y1), (x, y1 + 5.0), INK, false);
        let text = format!("{step:.0}");
        canvas.text(
            (x as usize).saturating_sub(text_width(&text) / 2),
            HEIGHT - BOTTOM + 10,
            &text,
            INK,
        );
    }
    canvas.line((x0, y0), (x0, y1), INK, false);
    canvas.line((x0, y1), (x1, y1), INK, false);
    canvas.text((WIDTH - text_width("step")) / 2, HEIGHT - 22, "step", INK);
    canvas.text(8, 10, "loss", INK);

    for pair in train.windows(2) {
        canvas.line(to_px(pair[0]), to_px(pair[1]), TRAIN_COLOR, true);
    }
    if let [only] = train.as_slice() {
        canvas.dot(to_px(*only), TRAIN_COLOR);
    }
    for pair in eval.windows(2) {
        canvas.line(to_px(pair[0]), to_px(pair[1]), EVAL_COLOR, true);
    }
    for &point in &eval {
        canvas.dot(to_px(point), EVAL_COLOR);
    }
    let legend_x = WIDTH - RIGHT - 180;
    canvas.line(
        (legend_x as f64, 17.0),
        (legend_x as f64 + 20.0, 17.0),
        TRAIN_COLOR,
        true,
    );
    canvas.text(legend_x + 28, 10, "train", INK);
    canvas.dot((legend_x as f64 + 112.0, 17.0), EVAL_COLOR);
    canvas.text(legend_x + 124, 10, "eval", INK);

    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&canvas.pixels))
        .expect("encoding a PNG into memory does not fail");
    bytes
}

/// Writes the loss curve of `metrics` to `path` (atomically).
pub fn write_loss_curve(path: &Path, metrics: &[MetricsLine]) -> Result<(), CliError> {
    write_atomic(path, &loss_curve_png(metrics)).map_err(|source| CliError::Io {
        path: path.to_path_buf(),
        source,
    })
}
