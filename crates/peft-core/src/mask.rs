//! Padding-aware positions and attention masks.
//!
//! Every model builds its masks and positions here, so that left padding, prefixes, virtual
//! tokens and the KV cache agree everywhere. A padding mask is `[batch, len]` of 0/1 (1 = real),
//! `None` meaning "all real". A real token's position is the number of real positions before it
//! (cache and prefix included), so a row's outputs do not depend on how much padding it got.

use burn::prelude::*;

use crate::error::CoreError;
use crate::model::ModelGeometry;

/// Joins the mask of cached positions with the mask of the current input into the mask of every
/// key, `[batch, past_len + seq]`. `None` when both are `None` (all real).
pub fn join_masks(
    past: Option<Tensor<2, Int>>,
    past_len: usize,
    current: Option<Tensor<2, Int>>,
    batch: usize,
    seq: usize,
    device: &Device,
) -> Option<Tensor<2, Int>> {
    match (past, current) {
        (None, None) => None,
        (past, current) => {
            let past = past.unwrap_or_else(|| Tensor::ones([batch, past_len], device));
            let current = current.unwrap_or_else(|| Tensor::ones([batch, seq], device));
            Some(if past_len == 0 {
                current
            } else {
                Tensor::cat(vec![past, current], 1)
            })
        }
    }
}

/// Position of every key, `[batch, len]`: for a real key the number of real keys before it,
/// 0 for padding (Hugging Face's `(cumsum(mask) - 1) * mask`, used by BLOOM's ALiBi).
pub fn key_positions(
    mask: Option<Tensor<2, Int>>,
    batch: usize,
    len: usize,
    device: &Device,
) -> Tensor<2, Int> {
    match mask {
        Some(mask) => (mask.clone().cumsum(1) - 1) * mask,
        None => Tensor::<1, Int>::arange(0..len as i64, device)
            .reshape([1, len])
            .expand([batch, len]),
    }
}

/// Positions of the last `seq` keys (the current input), `[batch, seq]`, from the mask of all keys.
pub fn query_positions(
    mask: Option<Tensor<2, Int>>,
    batch: usize,
    total: usize,
    seq: usize,
    device: &Device,
) -> Tensor<2, Int> {
    let past = total - seq;
    match mask {
        Some(mask) => {
            key_positions(Some(mask), batch, total, device).slice([0..batch, past..total])
        }
        None => Tensor::<1, Int>::arange(past as i64..total as i64, device)
            .reshape([1, seq])
            .expand([batch, seq]),
    }
}

/// Boolean attention mask `[batch, heads, seq, keys]`, `true` where a key is padding (masked),
/// for [`burn::tensor::module::attention`]; causality is left to its `is_causal` flag, which
/// aligns bottom-right and so accounts for prefix and cached keys. `None` when all keys are real.
pub fn padding_attention_mask(
    key_mask: Option<Tensor<2, Int>>,
    heads: usize,
    seq: usize,
) -> Option<Tensor<4, Bool>> {
    key_mask.map(|mask| {
        let [batch, keys] = mask.dims();
        mask.equal_elem(0)
            .reshape([batch, 1, 1, keys])
            .expand([batch, heads, seq, keys])
    })
}

/// Checks a batch of token ids (and optional mask) from a user against a model's geometry.
pub fn check_batch(
    geometry: &ModelGeometry,
    input_ids: &[Vec<i64>],
    attention_mask: Option<&[Vec<i64>]>,
    extra: usize,
) -> Result<(), CoreError> {
    let Some(first) = input_ids.first() else {
        return Err(CoreError::Shape {
            what: "input_ids",
            message: "the batch is empty".into(),
        });
    };
    let seq = first.len();
    if seq == 0 {
        return Err(CoreError::Shape {
            what: "input_ids",
            message: "rows are empty".into(),
        });
    }
    for (row, ids) in input_ids.iter().enumerate() {
        if ids.len() != seq {
            return Err(CoreError::Shape {
                what: "input_ids",
                message: format!(
                    "row {row} has {} tokens but row 0 has {seq}; pad rows to one length and mask the padding",
                    ids.len()
                ),
            });
        }
        if let Some((position, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id < 0 || **id as usize >= geometry.vocab_size)
        {
            return Err(CoreError::TokenOutOfRange {
                id,
                row,
                position,
                vocab_size: geometry.vocab_size,
            });
        }
    }
    if let Some(mask) = attention_mask {
        if mask.len() != input_ids.len() {
            return Err(CoreError::Shape {
                what: "attention_mask",
                message: format!(
                    "has {} rows but input_ids has {}",
                    mask.len(),
                    input_ids.len()
                ),
            });
        }
        for (row, values) in mask.iter().enumerate() {
            if values.len() != seq {
                return Err(CoreError::Shape {
                    what: "attention_mask",
                    message: format!(
                        "row {row} has {} values but input_ids rows have {seq}",
                        values.len()
                    ),
                });
            }
            if let Some((position, &value)) = values
                .iter()
                .enumerate()
                .find(|(_, v)| **v != 0 && **v != 1)
            {
                return Err(CoreError::BadMask {
                    value,
                    row,
                    position,
                });
            }
        }
    }
    if let Some(max) = geometry.max_positions
        && seq + extra > max
    {
        return Err(CoreError::SequenceTooLong {
            length: seq + extra,
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(rows: &[&[i64]], device: &Device) -> Tensor<2, Int> {
        let b = rows.len();
        let s = rows[0].len();
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [b, s]), device)
    }

    fn to_vec(t: Tensor<2, Int>) -> Vec<i64> {
        t.into_data().try_into_vec_as::<i64>().unwrap()
    }

    #[test]
    fn left_padded_positions_start_at_zero_for_the_first_real_token() {
        let device = Device::default();
        let mask = ints(&[&[0, 0, 1, 1], &[1, 1, 1, 1]], &device);
        let pos = key_positions(Some(mask), 2, 4, &device);
        assert_eq!(to_vec(pos), vec![0, 0, 0, 1, 0, 1, 2, 3]);
    }

    #[test]
    fn query_positions_continue_after_cache_and_prefix() {
        let device = Device::default();
        // 2 prefix positions (real), then a left-padded prompt of 3, then one new token.
        let full = ints(&[&[1, 1, 0, 1, 1, 1], &[1, 1, 1, 1, 1, 1]], &device);
        let pos = query_positions(Some(full), 2, 6, 1, &device);
        assert_eq!(to_vec(pos), vec![4, 5]);
        let none = query_positions(None, 2, 6, 2, &device);
        assert_eq!(to_vec(none), vec![4, 5, 4, 5]);
    }

    #[test]
    fn join_masks_fills_missing_parts_with_ones() {
        let device = Device::default();
        let cur = ints(&[&[0, 1]], &device);
        let joined = join_masks(None, 3, Some(cur), 1, 2, &device).unwrap();
        assert_eq!(to_vec(joined), vec![1, 1, 1, 0, 1]);
        assert!(join_masks(None, 3, None, 1, 2, &device).is_none());
    }

    #[test]
    fn check_batch_names_the_bad_input() {
        let geometry = ModelGeometry {
            num_layers: 1,
            hidden_size: 4,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 4,
            vocab_size: 10,
            max_positions: Some(4),
        };
        let err = check_batch(&geometry, &[vec![1, 2], vec![3]], None, 0).unwrap_err();
        assert!(err.to_string().contains("row 1 has 1 tokens"), "{err}");
        let err = check_batch(&geometry, &[vec![1, 12]], None, 0).unwrap_err();
        assert!(matches!(
            err,
            CoreError::TokenOutOfRange {
                id: 12,
                position: 1,
                ..
            }
        ));
        let err = check_batch(&geometry, &[vec![1, 2]], Some(&[vec![1, 2]]), 0).unwrap_err();
        assert!(matches!(err, CoreError::BadMask { value: 2, .. }));
        let err = check_batch(&geometry, &[vec![1, 2]], None, 3).unwrap_err();
        assert!(matches!(
            err,
            CoreError::SequenceTooLong { length: 5, max: 4 }
        ));
        check_batch(&geometry, &[vec![1, 2]], Some(&[vec![0, 1]]), 2).unwrap();
    }
}
