//! Sharing one output buffer between rayon tasks that write disjoint parts
//! of it (the attention and AMX kernels).

/// An output pointer shared by rayon tasks that each write a disjoint part
/// of the output (here and in the AMX products). It borrows the output
/// mutably for `'a`, so it cannot outlive the buffer, nor be used while
/// anything else reads or resizes it; it is `Send`/`Sync` only for element
/// types that are.
pub(crate) struct SendPtr<'a, T>(*mut T, std::marker::PhantomData<&'a mut [T]>);

impl<'a, T> SendPtr<'a, T> {
    /// Over a slice that the tasks write disjoint parts of.
    pub(crate) fn new(out: &'a mut [T]) -> Self {
        SendPtr(out.as_mut_ptr(), std::marker::PhantomData)
    }

    /// Over the spare capacity of `out`, which the tasks fill before the
    /// caller sets its length.
    pub(crate) fn spare(out: &'a mut Vec<T>) -> Self {
        SendPtr(out.as_mut_ptr(), std::marker::PhantomData)
    }

    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

impl<T> Clone for SendPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<'_, T> {}
// SAFETY: the tasks that share it write disjoint parts of the borrowed
// buffer (each use site says which), and the borrow ends with the loop.
unsafe impl<T: Send> Send for SendPtr<'_, T> {}
unsafe impl<T: Send> Sync for SendPtr<'_, T> {}
