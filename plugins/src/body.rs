//! Holding a body back until it is whole, for plugins that must see all of it (a transform, a
//! signature check): [`BodyBuffer`] takes each chunk out of the stream and hands back the
//! complete body with the last one, up to a byte limit.

use bytes::{Bytes, BytesMut};

/// The body grew past the buffer's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the body exceeds {0} bytes")]
pub struct BodyTooLarge(pub usize);

/// Collects a body chunk by chunk, up to `limit` bytes.
#[derive(Debug)]
pub struct BodyBuffer {
    limit: usize,
    buf: BytesMut,
}

impl BodyBuffer {
    pub fn new(limit: usize) -> Self {
        BodyBuffer {
            limit,
            buf: BytesMut::new(),
        }
    }

    /// Takes the chunk out of the stream (`*chunk` becomes `None`, so nothing is sent now) and
    /// keeps it. At `end_of_stream` returns the whole body; the caller puts what should be
    /// sent (the body, or a transformed one) back into `*chunk`. `Err` once the body grew past
    /// the limit (what was taken so far is dropped).
    pub fn push(
        &mut self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<Option<Bytes>, BodyTooLarge> {
        if let Some(c) = chunk.take() {
            if self.buf.len() + c.len() > self.limit {
                self.buf = BytesMut::new();
                return Err(BodyTooLarge(self.limit));
            }
            self.buf.extend_from_slice(&c);
        }
        Ok(end_of_stream.then(|| std::mem::take(&mut self.buf).freeze()))
    }

    /// Like [`BodyBuffer::push`], but past the limit hands back everything held so far with
    /// this chunk (`Err(bytes)`), for a plugin that then lets the body through untouched.
    pub fn push_or_release(
        &mut self,
        chunk: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<Option<Bytes>, Bytes> {
        if let Some(c) = chunk.take() {
            if self.buf.len() + c.len() > self.limit {
                let mut held = std::mem::take(&mut self.buf);
                held.extend_from_slice(&c);
                return Err(held.freeze());
            }
            self.buf.extend_from_slice(&c);
        }
        Ok(end_of_stream.then(|| std::mem::take(&mut self.buf).freeze()))
    }

    /// Bytes held so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_chunks_back_and_yields_the_whole_body_at_the_end() {
        let mut b = BodyBuffer::new(10);
        let mut c = Some(Bytes::from_static(b"hello "));
        assert_eq!(b.push(&mut c, false), Ok(None));
        assert_eq!(c, None, "nothing is sent before the end");
        let mut c = Some(Bytes::from_static(b"you"));
        assert_eq!(
            b.push(&mut c, true),
            Ok(Some(Bytes::from_static(b"hello you")))
        );
        // An end without a last chunk (Pingora's final call may carry none).
        let mut b = BodyBuffer::new(10);
        let mut c = Some(Bytes::from_static(b"abc"));
        b.push(&mut c, false).unwrap();
        let mut none = None;
        assert_eq!(
            b.push(&mut none, true),
            Ok(Some(Bytes::from_static(b"abc")))
        );
    }

    #[test]
    fn refuses_past_the_limit() {
        let mut b = BodyBuffer::new(4);
        let mut c = Some(Bytes::from_static(b"abc"));
        b.push(&mut c, false).unwrap();
        let mut c = Some(Bytes::from_static(b"de"));
        assert_eq!(b.push(&mut c, true), Err(BodyTooLarge(4)));
        assert!(b.is_empty());
    }
}
