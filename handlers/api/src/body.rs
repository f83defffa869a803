//! Bodies that arrive or leave in chunks: [`BodyStream`].
//!
//! A body of any size crosses the pipe as a stream of chunks with flow control: the node never
//! holds more of it than its window. A handler sees a streamed body in one of two ways:
//!
//! - a handler registered with [`Handlers::add`](crate::Handlers::add) gets the body whole in
//!   [`Request::body`](crate::Request::body), collected by the node up to [`COLLECT_LIMIT`]
//!   (a larger body is answered 413 before the handler runs);
//! - a handler registered with [`Handlers::add_streaming`](crate::Handlers::add_streaming)
//!   gets a [`BodyStream`] to read at its own pace, whatever the size.
//!
//! A handler replies with a stream through [`Reply::stream`](crate::Reply::stream), saying the
//! length when it knows it; the caller's HTTP response then carries `Content-Length`.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::io::AsyncRead;

/// The largest body a handler registered with [`Handlers::add`](crate::Handlers::add) gets
/// whole: 16 MiB. Larger bodies need a streaming handler.
pub const COLLECT_LIMIT: usize = 16 * 1024 * 1024;

/// The size of the chunks [`BodyStream::from_reader`] reads: 256 KiB (larger chunks cost fewer
/// wake-ups per byte; the measured gain over 64 KiB was about a quarter, docs/BENCHMARKS.md).
pub const CHUNK: usize = 256 * 1024;

/// Why a body stream ended before its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyError {
    /// The sender, the pipe or the caller went away mid-body: what arrived is incomplete.
    Aborted(String),
    /// The body went over a limit; nothing past it was read.
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// Reading the body's source failed (a file, an upstream).
    Io(String),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Aborted(why) => write!(f, "the body was cut short: {why}"),
            BodyError::TooLarge { limit } => {
                write!(f, "the body is over the limit of {limit} bytes")
            }
            BodyError::Io(why) => write!(f, "the body could not be read: {why}"),
        }
    }
}

impl std::error::Error for BodyError {}

impl From<std::io::Error> for BodyError {
    fn from(err: std::io::Error) -> Self {
        BodyError::Io(err.to_string())
    }
}

impl From<BodyError> for std::io::Error {
    fn from(err: BodyError) -> Self {
        let kind = match err {
            BodyError::Aborted(_) => std::io::ErrorKind::UnexpectedEof,
            BodyError::TooLarge { .. } => std::io::ErrorKind::InvalidData,
            BodyError::Io(_) => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, err)
    }
}

/// A body as a stream of chunks, with its length when it is known.
///
/// It is a [`Stream`] of `Result<Bytes, BodyError>`; an `Err` item means the body is
/// incomplete and nothing follows it. Dropping a stream before its end tells its source to
/// stop: a streamed request or reply is cancelled on the far node.
pub struct BodyStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, BodyError>> + Send>>,
    length: Option<u64>,
}

impl fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyStream")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl BodyStream {
    /// A body read from `stream`. `length`, when given, is the number of bytes it yields in
    /// all; a stream that yields more or fewer is cut off as incomplete by the node.
    pub fn new<S>(stream: S, length: Option<u64>) -> Self
    where
        S: Stream<Item = Result<Bytes, BodyError>> + Send + 'static,
    {
        BodyStream {
            inner: Box::pin(stream),
            length,
        }
    }

    /// A body of these bytes, in one chunk.
    pub fn once(bytes: impl Into<Bytes>) -> Self {
        let bytes: Bytes = bytes.into();
        let length = Some(bytes.len() as u64);
        let chunk = (!bytes.is_empty()).then_some(Ok(bytes));
        BodyStream::new(stream::iter(chunk), length)
    }

    /// An empty body.
    pub fn empty() -> Self {
        BodyStream::once(Bytes::new())
    }

    /// A body read from `reader` in chunks of [`CHUNK`] bytes, as it is consumed. With a
    /// `length`, exactly that many bytes are read (a reader that ends sooner makes the body
    /// incomplete).
    pub fn from_reader<R>(reader: R, length: Option<u64>) -> Self
    where
        R: AsyncRead + Send + 'static,
    {
        let chunks = tokio_util::io::ReaderStream::with_capacity(reader, CHUNK)
            .map(|r| r.map_err(BodyError::from));
        match length {
            None => BodyStream::new(chunks, None),
            Some(n) => BodyStream::new(exactly(chunks, n), Some(n)),
        }
    }

    /// A body of the `len` bytes of `file` from byte `start`, read on tokio's blocking threads
    /// in chunks of [`CHUNK`] bytes straight into the buffers that cross the pipe (one copy
    /// from the page cache, where a [`from_reader`](Self::from_reader) over `tokio::fs::File`
    /// makes two), with the next chunk read while the last one is sent. A file that ends
    /// sooner makes the body incomplete. At most two chunks are held at a time; dropping the
    /// body closes the file once the read in progress (one chunk) returns.
    pub fn from_file(file: std::fs::File, start: u64, len: u64) -> Self {
        let ahead = ReadAhead {
            file: std::sync::Arc::new(file),
            start: Some(start),
            unread: len,
            pending: None,
        };
        let chunks = stream::unfold((ahead, 0u64), move |(mut ahead, sent)| async move {
            if ahead.pending.is_none() {
                // The first read starts at the first poll, inside the runtime.
                ahead.read_next();
            }
            let (pending, want) = ahead.pending.take()?;
            let chunk = match pending.await {
                Ok(Ok(chunk)) if chunk.len() < want => Err(BodyError::Aborted(format!(
                    "the file ended after {} of the {len} bytes announced",
                    sent + chunk.len() as u64
                ))),
                Ok(Ok(chunk)) => Ok(chunk),
                Ok(Err(e)) => Err(BodyError::from(e)),
                Err(e) => Err(BodyError::Io(format!("reading the file: {e}"))),
            };
            let sent = match &chunk {
                Ok(c) => {
                    ahead.read_next();
                    sent + c.len() as u64
                }
                Err(_) => {
                    ahead.unread = 0;
                    sent
                }
            };
            Some((chunk, (ahead, sent)))
        });
        BodyStream::new(chunks, Some(len))
    }

    /// The length of the whole body, when it is known.
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    /// The next chunk; `None` at the end of the body.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, BodyError>> {
        self.inner.next().await
    }

    /// The whole body in one buffer. A body over `limit` bytes is [`BodyError::TooLarge`],
    /// found before more than `limit` bytes are held.
    pub async fn collect(mut self, limit: usize) -> Result<Bytes, BodyError> {
        let too_large = BodyError::TooLarge {
            limit: limit as u64,
        };
        if self.length.is_some_and(|n| n > limit as u64) {
            return Err(too_large);
        }
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        while let Some(chunk) = self.chunk().await {
            let chunk = chunk?;
            let held = first.as_ref().map_or(0, Bytes::len) + buf.len();
            if held + chunk.len() > limit {
                return Err(too_large);
            }
            match first.take() {
                // One chunk is kept as it is, without a copy.
                None if buf.is_empty() => first = Some(chunk),
                None => buf.extend_from_slice(&chunk),
                Some(f) => {
                    buf.reserve(f.len() + chunk.len());
                    buf.extend_from_slice(&f);
                    buf.extend_from_slice(&chunk);
                }
            }
        }
        Ok(first.unwrap_or_else(|| buf.freeze()))
    }

    /// The body as an [`AsyncRead`], to copy it into a file or a socket with
    /// `tokio::io::copy`. An incomplete body is a read error.
    pub fn into_reader(self) -> impl AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(self.map(|r| r.map_err(std::io::Error::from)))
    }
}

impl Stream for BodyStream {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

/// The state of [`BodyStream::from_file`]: the file, where the first read starts, what is
/// left to ask for, and the read in progress.
struct ReadAhead {
    file: std::sync::Arc<std::fs::File>,
    /// Where the first read starts; `None` once it has been asked for (the reads that follow
    /// go on from the file's cursor, one at a time).
    start: Option<u64>,
    unread: u64,
    /// The read in progress, and how many bytes it asked for.
    pending: Option<(tokio::task::JoinHandle<std::io::Result<Bytes>>, usize)>,
}

impl ReadAhead {
    /// Start reading the next chunk on a blocking thread, if any of the body is left.
    fn read_next(&mut self) {
        if self.unread == 0 {
            return;
        }
        let want = self.unread.min(CHUNK as u64) as usize;
        self.unread -= want as u64;
        let (file, seek) = (self.file.clone(), self.start.take());
        let read = tokio::task::spawn_blocking(move || read_chunk(&file, seek, want));
        self.pending = Some((read, want));
    }
}

/// Up to `want` bytes of `file` from its cursor, from byte `seek` first if given: fewer only
/// at the end of the file. The reads go into the vector's spare capacity, so the buffer is
/// never zeroed first; the standard library reads 8 KiB, then the rest in one call.
fn read_chunk(file: &std::fs::File, seek: Option<u64>, want: usize) -> std::io::Result<Bytes> {
    use std::io::{Read as _, Seek as _};
    let mut file = file;
    if let Some(at) = seek {
        file.seek(std::io::SeekFrom::Start(at))?;
    }
    let mut buf = Vec::with_capacity(want);
    file.take(want as u64).read_to_end(&mut buf)?;
    Ok(Bytes::from(buf))
}

/// `stream` cut to exactly `n` bytes: longer is trimmed, shorter is an [`BodyError::Aborted`]
/// at its end.
fn exactly<S>(stream: S, n: u64) -> impl Stream<Item = Result<Bytes, BodyError>> + Send
where
    S: Stream<Item = Result<Bytes, BodyError>> + Send + 'static,
{
    stream::unfold(
        (Box::pin(stream), n, false),
        |(mut inner, left, done)| async move {
            if done || left == 0 {
                return None;
            }
            match inner.next().await {
                Some(Ok(mut chunk)) => {
                    if chunk.len() as u64 > left {
                        chunk.truncate(left as usize);
                    }
                    let left = left - chunk.len() as u64;
                    Some((Ok(chunk), (inner, left, false)))
                }
                Some(Err(e)) => Some((Err(e), (inner, left, true))),
                None => Some((
                    Err(BodyError::Aborted(format!(
                        "the source ended {left} bytes before the length it announced"
                    ))),
                    (inner, left, true),
                )),
            }
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn collect_keeps_one_chunk_and_joins_many() {
        assert_eq!(BodyStream::once("abc").collect(3).await.unwrap(), "abc");
        let chunks = stream::iter(["ab", "cd", "e"].map(|s| Ok(Bytes::from(s))));
        let body = BodyStream::new(chunks, None).collect(5).await.unwrap();
        assert_eq!(body, "abcde");
        assert_eq!(BodyStream::empty().collect(0).await.unwrap(), "");
    }

    #[tokio::test]
    async fn collect_refuses_past_the_limit() {
        let err = BodyStream::once("abcd").collect(3).await.unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 3 });
        let chunks = stream::iter(["ab", "cd"].map(|s| Ok(Bytes::from(s))));
        let err = BodyStream::new(chunks, None).collect(3).await.unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 3 });
    }

    #[tokio::test]
    async fn a_reader_is_read_to_its_length() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let body = BodyStream::from_reader(std::io::Cursor::new(data.clone()), Some(200_000));
        assert_eq!(body.length(), Some(200_000));
        assert_eq!(&body.collect(usize::MAX).await.unwrap()[..], &data[..]);
        let short = BodyStream::from_reader(std::io::Cursor::new(vec![1u8; 10]), Some(20));
        assert!(matches!(
            short.collect(100).await.unwrap_err(),
            BodyError::Aborted(_)
        ));
        let long = BodyStream::from_reader(std::io::Cursor::new(vec![1u8; 30]), Some(20));
        assert_eq!(long.collect(100).await.unwrap().len(), 20);
    }

    #[tokio::test]
    async fn a_file_is_read_from_its_start_for_its_length() {
        use std::io::Write as _;
        // Two and a half chunks, so the read-ahead and a short last chunk both happen.
        let data: Vec<u8> = (0..CHUNK * 5 / 2).map(|i| (i % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let whole = BodyStream::from_file(file.try_clone().unwrap(), 0, data.len() as u64);
        assert_eq!(whole.length(), Some(data.len() as u64));
        assert_eq!(&whole.collect(usize::MAX).await.unwrap()[..], &data[..]);
        let part = BodyStream::from_file(file.try_clone().unwrap(), 1000, CHUNK as u64 + 7);
        let got = part.collect(usize::MAX).await.unwrap();
        assert_eq!(&got[..], &data[1000..1000 + CHUNK + 7]);
        let empty = BodyStream::from_file(file.try_clone().unwrap(), 5, 0);
        assert_eq!(empty.collect(0).await.unwrap(), "");
        // A file shorter than the length announced (truncated under the reader) is an
        // incomplete body, never a normal end.
        let past = BodyStream::from_file(file, data.len() as u64 - 10, 20);
        let err = past.collect(100).await.unwrap_err();
        assert_eq!(
            err,
            BodyError::Aborted("the file ended after 10 of the 20 bytes announced".into())
        );
    }

    #[tokio::test]
    async fn an_incomplete_body_is_a_read_error() {
        use tokio::io::AsyncReadExt;
        let chunks = stream::iter([
            Ok(Bytes::from("ab")),
            Err(BodyError::Aborted("pipe closed".into())),
        ]);
        let mut reader = BodyStream::new(chunks, None).into_reader();
        let mut out = Vec::new();
        let err = reader.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(out, b"ab");
    }
}
