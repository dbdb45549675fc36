//! The engine's transport, counted: every byte received goes into the
//! metrics by kind as it arrives, so a scrape during a download sees the
//! counter move.

use std::io::Read;
use std::sync::Arc;

use super::Shared;
use crate::error::UpdateError;
use crate::fetch::{Body, Transport};
use crate::metrics::FetchKind;

pub struct Metered {
    pub inner: Box<dyn Transport>,
    pub shared: Arc<Shared>,
}

struct Counting {
    inner: Box<dyn Read + Send>,
    shared: Arc<Shared>,
    kind: FetchKind,
}

impl Read for Counting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.shared.metric(|m| m.fetched(self.kind, n as u64));
        }
        Ok(n)
    }
}

impl Metered {
    fn counted(&self, mut b: Body, kind: FetchKind) -> Body {
        let inner = std::mem::replace(&mut b.resp, Box::new(std::io::empty()));
        b.resp = Box::new(Counting {
            inner,
            shared: self.shared.clone(),
            kind,
        });
        b
    }
}

impl Transport for Metered {
    fn get_small_opt(&self, url: &str, limit: usize) -> Result<Option<Vec<u8>>, UpdateError> {
        let r = self.inner.get_small_opt(url, limit)?;
        if let Some(b) = &r {
            self.shared
                .metric(|m| m.fetched(FetchKind::Metadata, b.len() as u64));
        }
        Ok(r)
    }

    fn get_from(&self, url: &str, offset: u64) -> Result<Body, UpdateError> {
        let b = self.inner.get_from(url, offset)?;
        Ok(self.counted(b, FetchKind::Full))
    }

    fn get_range(&self, url: &str, start: u64, end: u64) -> Result<Body, UpdateError> {
        let b = self.inner.get_range(url, start, end)?;
        Ok(self.counted(b, FetchKind::Delta))
    }

    fn get_listed(&self, url: &str) -> Result<Body, UpdateError> {
        let b = self.inner.get_listed(url)?;
        Ok(self.counted(b, FetchKind::Metadata))
    }
}
